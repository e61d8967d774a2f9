"""Every model shipped in models/ comes with what the README promises: a model card, VNN-LIB
properties for its first 100 test images at its ε, and metadata that names its data and ε."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from certkit.vnnlib import read_vnnlib

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted((REPO / "models").glob("*.onnx"))


def test_there_are_shipped_models():
    assert len(MODELS) >= 3


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_shipped_model_has_card_properties_and_metadata(model):
    card = model.with_suffix(".md").read_text()
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    assert card.startswith(f"# {model.name}\n")
    assert "certkit export --onnx" in card and f"models/{model.name}" in card  # the command that made it
    assert meta["dataset"] in model.stem and meta["training_method"] in card
    props = REPO / "vnnlib" / model.stem
    rows = [line.split(",") for line in (props / "instances.csv").read_text().splitlines()]
    assert len(rows) == 100
    for onnx_path, prop, timeout in rows:
        assert (props / onnx_path).resolve() == model.resolve() and float(timeout) > 0
        assert (props / prop).is_file() and f"eps{float(meta['eps']):.6g}" in prop
    prop = read_vnnlib(props / rows[0][1])
    assert prop.num_inputs == np.prod(json.loads(meta["input_shape"])) and len(prop.cases) == 1
    width = prop.cases[0].upper - prop.cases[0].lower  # 2ε, less where the pixel range clips the box
    assert float(meta["eps"]) < width.max() <= 2 * float(meta["eps"]) + 1e-6


@pytest.mark.parametrize("model", [m for m in MODELS if m.stem.startswith("mnist")], ids=lambda p: p.stem)
def test_shipped_mnist_models_classify_the_shipped_images(model):
    data = np.load(REPO / "data" / "mnist_test_100.npz")
    session = ort.InferenceSession(str(model))
    x = data["x"].astype(np.float32).reshape(-1, 1, 28, 28) / 255
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert (logits.argmax(1) == data["y"]).mean() >= 0.9
