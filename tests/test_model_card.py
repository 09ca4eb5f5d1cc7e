"""The model card: Hub metadata (base_model, datasets, pipeline_tag) that the Hub's model tree reads, and no link to
a page that does not exist."""

import json

from huggingface_hub import ModelCard

from dpi_hf.artifacts import write_card_training_data, write_model_card
from dpi_hf.core import CoreMask, plan_stages
from dpi_hf.data import TaskSpec
from dpi_hf.offline import MARKER_FILE, hub_model_id
from dpi_hf.run.train import card_training_data

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_base_model_is_a_hub_id_never_a_local_path(tmp_path):
    assert hub_model_id("offline:smollm2-135m-instruct") == SMOLLM2
    assert hub_model_id("smollm2-135m-instruct") == SMOLLM2
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / MARKER_FILE).write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    assert hub_model_id(converted) == SMOLLM2 and hub_model_id(str(converted)) == SMOLLM2
    assert hub_model_id(tmp_path) is None  # a local checkpoint of unknown origin
    assert hub_model_id("./runs/model") is None and hub_model_id("/no/such/dir") is None
    assert hub_model_id("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M" and hub_model_id(None) is None


def _plan():
    shapes = {"w": (10,)}
    import torch

    cores = {t: CoreMask.from_indices({"w": torch.tensor(idx)}, shapes) for t, idx in (("a", [0, 1]), ("b", [5, 6]))}
    return plan_stages(cores, 0.5)


def test_card_metadata_and_text(tmp_path):
    write_model_card(tmp_path, _plan(), {"core_signal": "fisher", "core_fraction": 0.2, "base_model": SMOLLM2})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == SMOLLM2 and card.data.pipeline_tag == "text-generation"
    assert "base_model" not in card.data.dpi and card.data.dpi["core_signal"] == "fisher"
    assert "pypi.org" not in card.text and "Σg² = `fisher`" in card.text
    # the training data: Hub ids as metadata, every task named in the text; the DPI section survives a rewrite
    tasks = [TaskSpec("gsm8k", source="hub", path="openai/gsm8k", config="main"),
             TaskSpec("chain_sum", source="reasoning_gym", path="chain_sum", max_samples=64, seed=1),
             TaskSpec("logiqa", source="logiqa_txt", path="/data/logiqa/Train.txt")]
    hub, other = card_training_data(tasks)
    assert hub == ["openai/gsm8k"]
    write_card_training_data(tmp_path, hub, other, base_model=hub_model_id("offline:smollm2-135m-instruct"))
    write_model_card(tmp_path, _plan(), {"core_signal": "fisher"})  # no base_model given: the card keeps its own
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["openai/gsm8k"] and card.data.base_model == SMOLLM2
    assert "generated with reasoning-gym (`chain_sum`, seed 1, 64 training rows)" in card.text
    assert "local file `Train.txt` (logiqa_txt)" in card.text and "/data/logiqa" not in card.text
    assert card.text.count("## Training data") == 1 and card.text.count("## Dynamic Parameter Isolation") == 1
