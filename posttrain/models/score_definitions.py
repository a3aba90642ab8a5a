"""What a detector's ``[..., 2]`` outputs mean as one score (higher = bona fide), per head kind; no torch here,
so the commands' ``--help`` and the report code stay light (``posttrain.models.heads`` picks one per head)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class ScoreDefinition:
    """How a head's ``[..., 2]`` outputs become one score (higher = bona fide), and what that score is."""

    name: str  # the ScoreType of score files, and the key of the score in score/serve/timeline results
    description: str  # in words (posttrain.eval.report.SCORE_TYPES)
    logits: bool  # the outputs are logits: softmax (sigmoid of logit_diff) is an uncalibrated P(real)
    threshold: float  # the uncalibrated decision: bona fide when score >= threshold
    threshold_reason: str

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """The score of each ``[..., 2]`` output row in [fake, real] order (float64)."""
        outputs = np.asarray(outputs, dtype=np.float64)
        return outputs[..., 1] - outputs[..., 0] if self.logits else outputs[..., 1]


LOGIT_DIFF = ScoreDefinition("logit_diff", "real logit minus fake logit", logits=True, threshold=0.0,
                             threshold_reason="a tie of the two logits is bona fide")
COSINE_NAME = "cosine"
COSINE_DESCRIPTION = "cosine between the embedding and the one-class (OC-softmax) head's weight"
# every score definition a head can have, by name (the threshold of "cosine" depends on the head's margins)
SCORE_DESCRIPTIONS = {LOGIT_DIFF.name: LOGIT_DIFF.description, COSINE_NAME: COSINE_DESCRIPTION}


def cosine_definition(margin_real: float, margin_fake: float) -> ScoreDefinition:
    """The one-class head's score: the cosine, decided midway between its two margins."""
    return ScoreDefinition(COSINE_NAME, COSINE_DESCRIPTION, logits=False, threshold=(margin_real + margin_fake) / 2,
                           threshold_reason=f"midway between the OC-softmax margins {margin_real:g} and "
                                            f"{margin_fake:g}, where both classes' training losses are equal")
