"""The model card (``README.md``) of a published detector, with its Hugging Face front matter.

Everything in it is read from files that travel with the model: the identity (``posttrain.json``:
preset, SSL config, training config and counters, calibration, licence), the shard indexes the
training config names (hours per corpus, label and language), and the ``result.yaml`` of each test
set. Nothing is typed in by hand, so the card cannot drift from the model it describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.eval.metrics import METRICS
from posttrain.eval.report import RESULT_FORMAT

TAGS = ["audio-classification", "anti-spoofing", "deepfake-detection", "speech", "posttrain"]
TOTAL_TABLES = {"by_corpus": "corpus", "by_label": "label", "by_language": "language"}
LICENSE_NAMES = {"cc-by-nc-sa-4.0": "Creative Commons Attribution-NonCommercial-ShareAlike 4.0 "
                                    "(https://creativecommons.org/licenses/by-nc-sa/4.0/)"}
# config sections (and keys) shown as training hyper-parameters
HYPERPARAMETER_SECTIONS = ("model", "optim", "schedule", "train", "sam", "rawboost", "dual_path")
DATA_KEYS = ("max_batch_seconds", "max_batch_size", "num_buckets", "crop", "weights")


@dataclass
class TestResult:
    name: str
    path: str
    document: dict[str, Any]  # the result.yaml


@dataclass
class TrainingData:
    """Totals of the training shard sets, summed; ``missing`` lists shard folders not readable now."""

    sources: list[str] = field(default_factory=list)
    totals: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


@dataclass
class CardInputs:
    identity: Mapping[str, Any]  # posttrain.json
    num_parameters: int
    repo_id: str | None = None  # where it will be published (for the usage snippet)
    results: Sequence[TestResult] = ()
    training_data: TrainingData | None = None


def read_result(path: str | Path) -> TestResult:
    """A ``result.yaml`` written by ``posttrain eval``/``metrics``; the test set is named by its data
    identity when it has a name, else by the report folder."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read a result.yaml: {error}") from None
    if not isinstance(document, dict) or document.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path}: format: expected {RESULT_FORMAT!r}")
    data = document.get("data") or {}
    name = data.get("name") or data.get("test_set") or _data_name(data) or path.parent.name
    return TestResult(name=str(name), path=str(path), document=document)


def _data_name(data: Mapping[str, Any]) -> str | None:
    """What a reader of the card recognises a test set by: its shard folder's last three parts
    (``demo_data/shards/test``) or its protocol file's name, not the report folder ("test")."""
    if data.get("directory"):
        return "/".join(Path(str(data["directory"])).parts[-3:])
    if data.get("protocol"):
        return Path(str(data["protocol"])).name
    return None


def training_data(shard_dirs: Sequence[str | Path]) -> TrainingData:
    """Sum the ``index.json`` totals of the training shard sets (counts per corpus, label, language)."""
    from posttrain.data.shards import ShardFormatError, load_index

    data = TrainingData()
    for directory in shard_dirs:
        try:
            index = load_index(directory)
        except ShardFormatError:
            data.missing.append(str(directory))
            continue
        data.sources.append(str(directory))
        for group in TOTAL_TABLES:
            table = data.totals.setdefault(group, {})
            for value, count in index["totals"][group].items():
                row = table.setdefault(value, {"samples": 0, "seconds": 0.0})
                row["samples"] += count["samples"]
                row["seconds"] += count["seconds"]
    return data


# ---------------------------------------------------------------------------------------- rendering


def front_matter(inputs: CardInputs) -> dict[str, Any]:
    identity = inputs.identity
    matter: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "audio-classification",
                              "tags": [*TAGS, identity["architecture"]]}
    if identity.get("license"):  # unknown: left out rather than guessed
        matter["license"] = identity["license"]
    base_model = identity.get("base_model")
    if base_model:
        matter["base_model"] = base_model
    scored = [result for result in inputs.results if (result.document.get("metrics") or {}).get("eer") is not None]
    if scored:  # the hub's model-index: one EER (%) per test set
        matter["model-index"] = [{"name": inputs.repo_id or "posttrain-detector", "results": [
            {"task": {"type": "audio-classification", "name": "speech deepfake detection"},
             "dataset": {"type": result.name, "name": result.name},
             "metrics": [{"type": "eer", "name": "EER (%)",
                          "value": round(100 * result.document["metrics"]["eer"], 4)}]}
            for result in scored]}]
    return matter


def render_card(inputs: CardInputs) -> str:
    identity = inputs.identity
    sections = [
        f"---\n{yaml.safe_dump(front_matter(inputs), sort_keys=False)}---\n",
        _overview(inputs), _usage(inputs), _input_normalisation(inputs), _model(inputs),
        _training(identity, inputs.training_data),
        _evaluation(inputs.results), _calibration(identity, inputs.results), _intended_use(identity),
        _license(identity), _provenance(identity),
    ]
    return "\n".join(section for section in sections if section)


def _overview(inputs: CardInputs) -> str:
    identity = inputs.identity
    converted = (identity.get("source") or {}).get("kind") == "antideepfake" and identity.get("base_model")
    title = inputs.repo_id or (f"{identity['base_model']}, converted to transformers" if converted else
                               f"{identity.get('preset') or identity['architecture']} speech deepfake detector")
    base = f" It is based on `{identity['base_model']}`." if identity.get("base_model") else ""
    return (f"# {title}\n\nA speech deepfake detector: a {identity['architecture']} encoder "
            f"(preset `{identity.get('preset')}`), the mean of its last layer over the valid frames, and a "
            f"linear layer giving two logits, **[fake, real]** (labels `fake`, `real`). The detection score "
            f"is the real logit minus the fake logit (`{identity.get('score_definition', 'logit_diff')}`): "
            f"higher means bona fide.{base} It runs with `transformers` alone.\n")


def _usage(inputs: CardInputs) -> str:
    model = inputs.repo_id or "path/to/this/folder"
    group_norm = (inputs.identity.get("ssl_config") or {}).get("feat_extract_norm") == "group"
    batching = ("Score one file per call: in a padded batch, transformers' group norm (first conv layer) takes "
                "the padding into its statistics (`posttrain score` masks it). ") if group_norm else ""
    return ("## Usage\n\n```python\nfrom transformers import pipeline\n\n"
            f'detector = pipeline("audio-classification", model="{model}")\n'
            'detector("speech.wav")  # [{"label": "real", "score": ...}, {"label": "fake", "score": ...}]\n```\n\n'
            "The feature extractor resamples nothing: give 16 kHz mono audio (the pipeline resamples files it "
            "decodes itself). Each utterance is normalised to zero mean and unit variance (see Input "
            f"normalisation). {batching}"
            "For long recordings, score windows and aggregate them (`posttrain score`).\n")


def _input_normalisation(inputs: CardInputs) -> str:
    norm = inputs.identity.get("input_normalisation")
    if not norm:
        return ""
    text = (f"## Input normalisation\n\nThe model was trained on `{norm['formula']}` with eps = {norm['eps']:g} "
            f"({norm['as_in']}); `posttrain score` and `posttrain eval` read it from `posttrain.json` and "
            f"score exactly so.")
    gap = inputs.identity.get("stock_pipeline_gap")
    if not gap:
        return text + " The stock feature extractor (`pipeline`) normalises the same way.\n"
    model = inputs.repo_id or "path/to/this/folder"
    rows = [("max |logit difference|", *(f"{value:.1e}" for value in gap["max_abs_logit_diff"]))]
    return (text + f" The stock `Wav2Vec2FeatureExtractor` (what `pipeline` uses) has eps "
            f"{gap['stock_extractor_eps']:g} built in, with no setting to change it, so on quiet input its "
            f"scores drift from the model's own. Measured on this model with a {gap['probe']}, per input peak "
            f"level:\n\n" + _table(("input peak (dBFS)", *(f"{level:g}" for level in gap["levels_dbfs"])), rows)
            + "\nExact scores with `transformers` alone: normalise yourself and turn the extractor's off.\n\n"
            "```python\nimport torch\nfrom transformers import AutoFeatureExtractor, AutoModelForAudioClassification\n\n"
            f'extractor = AutoFeatureExtractor.from_pretrained("{model}", do_normalize=False)\n'
            f'model = AutoModelForAudioClassification.from_pretrained("{model}")\n'
            f"wave = torch.nn.functional.layer_norm(wave, wave.shape, eps={norm['eps']:g})  # 16 kHz mono, float32\n"
            'logits = model(**extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")).logits\n```\n')


def _model(inputs: CardInputs) -> str:
    ssl = inputs.identity.get("ssl_config") or {}
    rows = [("preset", inputs.identity.get("preset")), ("architecture", inputs.identity["architecture"]),
            ("parameters", f"{inputs.num_parameters:,} ({inputs.num_parameters / 1e6:.1f} M)"),
            ("transformer layers", ssl.get("num_hidden_layers")), ("hidden size", ssl.get("hidden_size")),
            ("feed-forward size", ssl.get("intermediate_size")), ("attention heads", ssl.get("num_attention_heads")),
            ("feature extractor", f"{len(ssl.get('conv_dim', []))} conv layers, {ssl.get('feat_extract_norm')} norm"),
            ("sample rate", f"{inputs.identity.get('sample_rate_hz', SAMPLE_RATE_HZ)} Hz")]
    return "## Model\n\n" + _table(("field", "value"), rows)


def _training(identity: Mapping[str, Any], data: TrainingData | None) -> str:
    training = identity.get("training")
    if not training:
        source = identity.get("source") or {}
        if source.get("kind") == "antideepfake":
            return ("## Training\n\nConverted from the AntiDeepfake release "
                    f"`{identity.get('base_model') or source.get('path')}` (fairseq layout) without retraining; "
                    "its training data and hyper-parameters are described on that model's card.\n")
        return ""
    lines = ["## Training data\n"]
    if data is None or not data.totals:
        lines.append("The training shard indexes were not available when this card was written.\n")
    else:
        lines.append(f"Shard sets: {', '.join(f'`{s}`' for s in data.sources)}.\n")
        for group, name in TOTAL_TABLES.items():
            rows = [(value, f"{count['seconds'] / 3600:.3f}", count["samples"])
                    for value, count in sorted(data.totals[group].items())]
            total_seconds = sum(count["seconds"] for count in data.totals[group].values())
            total_samples = sum(count["samples"] for count in data.totals[group].values())
            rows.append(("**total**", f"{total_seconds / 3600:.3f}", total_samples))
            lines.append(f"Per {name}:\n\n" + _table((name, "hours", "samples"), rows))
    if data is not None and data.missing:
        lines.append(f"Not readable when the card was written: {', '.join(f'`{m}`' for m in data.missing)}.\n")
    lines.append("## Training hyper-parameters\n")
    config = training.get("config") or {}
    rows = [(f"{section}.{key}", _value(value)) for section in HYPERPARAMETER_SECTIONS
            for key, value in _shown_settings(config.get(section) or {}).items()]
    train_stream = ((config.get("data") or {}).get("train") or {})
    rows += [(f"data.train.{key}", _value(train_stream[key])) for key in DATA_KEYS if key in train_stream]
    lines.append(_table(("setting", "value"), rows) if rows else "The training configuration was not recorded.\n")
    progress = [(f"{key}.{inner}" if isinstance(value, dict) else key, _value(item))
                for key, value in training.items() if key != "config"
                for inner, item in (value.items() if isinstance(value, dict) else [(None, value)])]
    if progress:
        lines.append("Training state of this checkpoint:\n\n" + _table(("field", "value"), progress))
    return "\n".join(lines)


def _shown_settings(section: Mapping[str, Any]) -> Mapping[str, Any]:
    """A switched-off component (``enabled: false``) is shown by that switch alone."""
    return {"enabled": False} if section.get("enabled") is False else section


def _evaluation(results: Sequence[TestResult]) -> str:
    if not results:
        return ""
    rows = []
    for result in results:
        metrics, counts = result.document.get("metrics") or {}, result.document.get("counts") or {}
        rows.append((result.name, counts.get("trials"), *(m.format(metrics.get(m.name)) for m in METRICS)))
    lines = ["## Evaluation\n", _table(("test set", "trials", *(m.column for m in METRICS)), rows),
             "minDCF/actDCF use the ASVspoof 5 costs; actDCF and Cllr are computed on calibrated LLRs when the "
             "evaluation had a calibration (see each result's `llr_source`).\n"]
    for result in results:
        lines.append(f"<details><summary>{result.name}: result.yaml</summary>\n\n```yaml\n"
                     f"{yaml.safe_dump(result.document, sort_keys=False)}```\n\n</details>\n")
    return "\n".join(lines)


def _calibration(identity: Mapping[str, Any], results: Sequence[TestResult]) -> str:
    calibration = identity.get("calibration")
    lines = ["## Calibration and decision threshold\n"]
    if calibration:
        lines.append(f"`llr = {calibration['slope']:.6g} * score + {calibration['offset']:.6g}` "
                     f"(logistic-regression calibration, prior {calibration['prior_bona_fide']}).")
        if calibration.get("score_threshold") is not None:
            lines.append(f" Decide *bona fide* when the score is >= **{calibration['score_threshold']:.6g}** "
                         f"(the Bayes threshold for costs {calibration.get('threshold_costs')}).")
        lines.append("\n")
    else:
        lines.append("No calibration was published with this model: its scores are not log-likelihood ratios.\n")
    thresholds = [(r.name, _number((r.document.get("metrics") or {}).get("eer_threshold"))) for r in results]
    if thresholds:
        lines.append("Score thresholds at the EER of each test set (a-posteriori, for reference):\n\n"
                     + _table(("test set", "EER threshold"), thresholds))
    return "\n".join(lines)


def _intended_use(identity: Mapping[str, Any]) -> str:
    return ("## Intended use and limitations\n\n"
            "For research on detecting synthetic or manipulated speech, and as a starting point for fine-tuning. "
            "Scores are evidence, not proof: error rates depend strongly on the domain (codec, channel, "
            "language, generator), new generators may not be detected, and real speech that was processed "
            "(vocoded, restored, heavily compressed) can be scored as fake. Do not use it as the sole basis for "
            "decisions about people. Pick thresholds on data from the target domain.\n")


def _license(identity: Mapping[str, Any]) -> str:
    license_id = identity.get("license")
    if not license_id:
        return "## License\n\nNo licence was recorded for these weights; ask the publisher before reuse.\n"
    name = LICENSE_NAMES.get(license_id, license_id)
    inherited = (" It is inherited from the converted AntiDeepfake release."
                 if (identity.get("source") or {}).get("kind") == "antideepfake" else "")
    return f"## License\n\n{name}.{inherited}\n"


def _provenance(identity: Mapping[str, Any]) -> str:
    source = {key: value for key, value in (identity.get("source") or {}).items() if value not in (None, [], {})}
    if not source:
        return ""
    return "## Provenance\n\n" + _table(("field", "value"), [(k, _value(v)) for k, v in source.items()])


# ------------------------------------------------------------------------------------------ helpers


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip() \
        if isinstance(value, (dict, list)) else str(value)


def _number(value: Any) -> str | None:
    return None if value is None else f"{float(value):.4f}"
