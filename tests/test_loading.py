"""Loading a model (sharp_cli/loading.py): dtype and quantization by device, remote code off unless
asked, pickled weights refused without being opened."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from sharp_cli.cli import app
from videos import make_video

runner = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def unicode_video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("h") / "clip é ü.mp4", n_frames=16, fps=8, size=(112, 84)))


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_and_nf4_compute_dtype_follow_the_gpu(monkeypatch, model_dirs, native, expected):
    """bf16 only where the GPU has it in hardware (is_bf16_supported(including_emulation=False));
    the nf4 compute dtype follows the model's."""
    pytest.importorskip("bitsandbytes")

    from sharp_cli import loading

    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        calls.append(including_emulation) or (native or including_emulation))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert loading.resolve_dtype("auto", torch.device("cuda")) == expected and calls == [False]
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    seen = _from_pretrained_kwargs(monkeypatch, model_dirs, device="cuda", quant="nf4")
    assert seen["dtype"] == expected and seen["quantization_config"].bnb_4bit_compute_dtype == expected


def test_sharp_tiny_is_not_quantized_by_default_on_a_gpu():
    import torch

    from sharp_cli.loading import resolve_quant

    cuda = torch.device("cuda")
    assert resolve_quant("auto", cuda, "sharp-tiny") == "none"
    assert resolve_quant("auto", cuda, "Qwen/Qwen2.5-VL-7B-Instruct") == "nf4"
    assert resolve_quant("nf4", cuda, "sharp-tiny") == "nf4"  # asked for: done


def test_remote_code_is_off_unless_asked(monkeypatch, model_dirs):
    from sharp_cli import loading

    seen = {}
    from transformers import AutoModelForImageTextToText

    real = AutoModelForImageTextToText.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy)
    loading.load(str(model_dirs["qwen2.5-vl"]), device="cpu")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    loading.load(str(model_dirs["qwen2.5-vl"]), device="cpu", trust_remote_code=True)
    assert seen["trust_remote_code"] is True


def test_pickle_weights_are_refused(model_dirs, unicode_video, tmp_path, monkeypatch):
    """A real pickle checkpoint folder (config and processor fine, weights torch.save'd) behind a
    real video: the run gets past the video and the config to the weights, refuses them in one
    line, and never unpickles anything."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(model_dirs["qwen2.5-vl"], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or real_load(*a, **k))
    decoded = []
    from sharp_cli import video as video_mod

    real_decode = video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
    result = runner.invoke(app, ["ask", unicode_video, "what?", "-m", str(folder), *SMALL])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pickled" in result.stderr and "pytorch_model.bin" in result.stderr and "safetensors" in result.stderr
    assert decoded and not unpickled  # it reached the weights, and left them unopened

    (folder / "pytorch_model.bin").unlink()  # no weights at all: said as such, not transformers' words
    result = runner.invoke(app, ["ask", unicode_video, "what?", "-m", str(folder), *SMALL])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "it has no weights (no *.safetensors file)" in result.stderr


@pytest.mark.parametrize("dtype, padded", [(torch.float32, True), (torch.bfloat16, False)])
def test_vision_mlps_are_padded_only_where_it_pays(dtype, padded):
    """On a CPU the aligned width speeds float32 products and not bfloat16 ones, so a bf16 load
    skips the copy of every vision MLP weight (models/vision_mlp.py): its weights stay the tensors
    from_pretrained made; a float32 one is padded 60 -> 64, with the same output."""
    from sharp_cli import loading
    from sharp_cli.models import adapter_for
    from sharp_cli.models.random_init import build_random, tiny_config

    config = tiny_config("qwen2.5-vl")
    config.vision_config.intermediate_size = 60
    model, processor = build_random(config, dtype=dtype)
    mlp = model.model.visual.blocks[0].mlp
    weight = mlp.down_proj.weight
    x = torch.randn(8, config.vision_config.hidden_size, dtype=dtype)
    with torch.inference_mode():
        before = mlp(x)
    loading.ready(loading.Loaded(model, processor, adapter_for(config), "tiny", torch.device("cpu"), dtype,
                                 "none", True))
    assert (mlp.down_proj.weight is not weight) == padded
    assert mlp.down_proj.in_features == mlp.gate_proj.out_features == (64 if padded else 60)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, index, expected", [("cuda", 1, {"": 1}), ("cpu", 0, None)])
def test_a_gpu_load_goes_straight_to_the_current_gpu(monkeypatch, model_dirs, device, index, expected):
    """Unquantized on CUDA too, from_pretrained places the weights on the current GPU (a device
    map of one device: no accelerate hooks), as a plain transformers load does, instead of
    loading into host memory and copying with .to() after; a CPU load has no device map."""


    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: index)
    seen = _from_pretrained_kwargs(monkeypatch, model_dirs, device=device, quant="none", dtype="bfloat16")
    assert seen.get("device_map") == expected and "quantization_config" not in seen


def _from_pretrained_kwargs(monkeypatch, model_dirs, **load_kwargs) -> dict:
    """What loading.load hands transformers' from_pretrained for the tiny Qwen2.5-VL (the load
    stops there)."""
    from transformers import AutoModelForImageTextToText

    from sharp_cli import loading

    seen = {}

    class Stop(Exception):
        pass

    def capture(name, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", capture)
    with pytest.raises(Stop):
        loading.load(str(model_dirs["qwen2.5-vl"]), **load_kwargs)
    return seen
