"""optim/partitions.py reads private ZeRO internals: an untested DeepSpeed is refused with a message naming it."""

import re

import pytest

from posttrain.errors import UserError
from posttrain.optim.partitions import check_deepspeed_version


def test_the_installed_deepspeed_is_a_tested_one():
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0", "dev"])
def test_an_untested_deepspeed_fails_naming_version_and_fix(version):
    with pytest.raises(UserError, match=rf"DeepSpeed {re.escape(version)} is untested.*deepspeed>=0\.19,<0\.20"):
        check_deepspeed_version(version)
