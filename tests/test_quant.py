"""Tests for the 4-bit (QLoRA) support layer, ``laplace_lora_ext.quant``.

A tiny random Llama is saved to disk and reloaded in 4-bit nf4 with bitsandbytes on CPU
(nothing is downloaded). Hidden sizes are multiples of 64: bitsandbytes' 4-bit blocksize on CPU
is 64 and its CPU inference repacking reshapes the block scales to ``[N, K / 64]``, which needs
``K % 64 == 0`` (and ``N % 32 == 0``). ``intermediate_size=128`` gives ``down_proj`` two
blocks per row, which exercises the transposed scale layout.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

from laplace_lora_ext import quant
from laplace_lora_ext.testing import perturb_lora_B

HIDDEN = 64
INTERMEDIATE = 128
VOCAB = 96
SEQ = 8


def _avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (bitsandbytes' own check, else /proc/cpuinfo)."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:
        try:
            with open("/proc/cpuinfo") as f:
                return "avx512_bf16" in f.read()
        except OSError:
            return False


needs_avx512_bf16 = pytest.mark.skipif(
    not (quant.bitsandbytes_available() and _avx512_bf16()),
    reason="bitsandbytes repacks 4-bit weights for CPU inference only with AVX512-BF16",
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """Directory holding a tiny random float32 ``LlamaForCausalLM``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture()
def load_qlora(tiny_llama_dir):
    """Factory: the tiny Llama in 4-bit nf4 (float32 compute) with a perturbed LoRA on q, v."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def load(double_quant: bool = False) -> nn.Module:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=double_quant,
        )
        base = transformers.LlamaForCausalLM.from_pretrained(
            tiny_llama_dir, quantization_config=bnb_config, device_map="cpu"
        )
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(base, lora)
        perturb_lora_B(model, seed=1, scale=0.1, dtype=torch.get_default_dtype())
        return model

    return load


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))


def _lora_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _lora_grads(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """LoRA gradients of the LM loss, with the model in eval mode (as Laplace uses it)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in _lora_params(model)}


def _no_grad_probe(model: nn.Module, input_ids: torch.Tensor) -> None:
    """What laplace-torch's ``fit`` does first: an eval-mode forward under ``torch.no_grad``."""
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)


def _assert_grads_close(actual, expected, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        assert actual[name] is not None, name
        atol = rtol * float(g.abs().max())
        torch.testing.assert_close(actual[name], g, rtol=rtol, atol=atol, msg=name)


def _linear4bit(model: nn.Module):
    return [(n, m) for n, m in quant._iter_bnb_linear4bit(model)]


# ---------------------------------------------------------------------------------------------
# the CPU repacking trap


@needs_avx512_bf16
def test_trap_no_grad_probe_silently_drops_lora_gradients(load_qlora, input_ids):
    model = load_qlora()
    before = _lora_grads(model, input_ids)
    assert all(g is not None for g in before.values())

    _no_grad_probe(model, input_ids)

    assert quant.packed_4bit_modules(model)  # e.g. ...layers.0.self_attn.o_proj
    after = _lora_grads(model, input_ids)
    assert len(after) == 8 and all(g is None for g in after.values())  # silently, no error
    with pytest.raises(RuntimeError, match="no gradient reached 8 parameter") as info:
        quant.check_lora_gradients(_lora_params(model), "test backward", model=model)
    assert "lora_B" in str(info.value) and "bitsandbytes repacks" in str(info.value)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_prepare_keeps_gradients_equal_to_dequantized_reference(
    load_qlora, input_ids, double_quant
):
    model = load_qlora(double_quant)
    n_linear4bit = len(_linear4bit(model))
    assert n_linear4bit == 2 * 7  # q, k, v, o, gate, up, down per layer (lm_head stays fp32)

    assert quant.prepare_4bit_for_laplace(model) == n_linear4bit
    assert quant.prepare_4bit_for_laplace(model) == n_linear4bit  # idempotent
    assert all(not m.support_avx512bf16_for_cpu for _, m in _linear4bit(model))

    reference = quant.dequantize_4bit_to_linear(model)
    expected = _lora_grads(reference, input_ids)

    _no_grad_probe(model, input_ids)
    assert quant.packed_4bit_modules(model) == []
    actual = _lora_grads(model, input_ids)
    quant.check_lora_gradients(_lora_params(model), "test backward", model=model)
    _assert_grads_close(actual, expected, rtol=1e-4)


@needs_avx512_bf16
@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_prepare_restores_already_repacked_layers(load_qlora, input_ids, double_quant):
    import bitsandbytes.functional as bnb_f

    model = load_qlora(double_quant)
    original = {
        n: (m.weight.data.clone(), bnb_f.dequantize_4bit(m.weight.data, m.weight.quant_state))
        for n, m in _linear4bit(model)
    }
    grads_original = _lora_grads(model, input_ids)

    _no_grad_probe(model, input_ids)
    packed = quant.packed_4bit_modules(model)
    assert packed
    with pytest.raises(RuntimeError, match="before any no-grad forward"):
        quant.prepare_4bit_for_laplace(model, restore_packed=False)

    with pytest.warns(UserWarning, match=f"Restored {len(packed)} bitsandbytes"):
        assert quant.prepare_4bit_for_laplace(model) == len(original)
    assert quant.packed_4bit_modules(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quant.prepare_4bit_for_laplace(model)  # nothing left to restore: no warning

    for name, module in _linear4bit(model):
        codes, weight = original[name]
        state = module.weight.quant_state
        assert module.quant_state is state
        assert torch.equal(module.weight.data, codes), name  # 4-bit codes bit-exact
        # block scales came back rounded to bfloat16 (relative error <= 2**-9)
        restored = bnb_f.dequantize_4bit(module.weight.data, state)
        torch.testing.assert_close(restored, weight, rtol=2**-8, atol=0.0)

    _no_grad_probe(model, input_ids)  # no repacking any more
    assert quant.packed_4bit_modules(model) == []
    grads = _lora_grads(model, input_ids)
    quant.check_lora_gradients(_lora_params(model), "test backward", model=model)
    # exact w.r.t. the restored weights ...
    _assert_grads_close(grads, _lora_grads(quant.dequantize_4bit_to_linear(model), input_ids), 1e-4)
    # ... and close to the gradients of the model as loaded
    _assert_grads_close(grads, grads_original, rtol=2e-2)


@needs_avx512_bf16
def test_dequantize_reference_of_a_repacked_model_leaves_it_untouched(load_qlora, input_ids):
    model = load_qlora()
    _no_grad_probe(model, input_ids)
    packed = quant.packed_4bit_modules(model)
    reference = quant.dequantize_4bit_to_linear(model)
    assert quant.packed_4bit_modules(model) == packed
    assert not quant.is_quantized_4bit(reference)
    with pytest.warns(UserWarning):
        quant.prepare_4bit_for_laplace(model)
    _assert_grads_close(_lora_grads(model, input_ids), _lora_grads(reference, input_ids), 1e-4)


# ---------------------------------------------------------------------------------------------
# detection, reference model, errors


def test_is_quantized_4bit_and_reference_model(load_qlora):
    model = load_qlora()
    assert quant.is_quantized_4bit(model)
    assert quant.is_quantized_4bit(model.get_base_model())
    lora_layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert quant.is_quantized_4bit(lora_layer)  # peft LoRA layer wrapping a Linear4bit

    reference = quant.dequantize_4bit_to_linear(model)
    assert not quant.is_quantized_4bit(reference)
    assert quant.is_quantized_4bit(model)  # the original is untouched
    ref_q = reference.get_base_model().model.layers[0].self_attn.q_proj
    assert type(ref_q.base_layer) is nn.Linear
    assert ref_q.base_layer.weight.dtype == torch.float32
    assert not ref_q.base_layer.weight.requires_grad
    assert not getattr(reference.get_base_model(), "is_loaded_in_4bit", False)
    assert not hasattr(reference.get_base_model().config, "quantization_config")
    assert [n for n, _ in _lora_params(reference)] == [n for n, _ in _lora_params(model)]
    assert quant.prepare_4bit_for_laplace(reference) == 0

    assert not quant.is_quantized_4bit(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


class _FakeLinear4bit(nn.Linear):
    """Stands in for ``bitsandbytes.nn.Linear4bit`` when bitsandbytes is absent."""


_FakeLinear4bit.__name__ = "Linear4bit"
_FakeLinear4bit.__module__ = "bitsandbytes.nn.modules"


def test_missing_bitsandbytes(monkeypatch):
    model = nn.Sequential(_FakeLinear4bit(4, 4))
    plain = nn.Sequential(nn.Linear(4, 4))
    assert quant.is_quantized_4bit(model)  # by class name, no import needed

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    assert not quant.bitsandbytes_available()
    for func in (quant.prepare_4bit_for_laplace, quant.dequantize_4bit_to_linear):
        with pytest.raises(ImportError, match=r'pip install "laplace-lora-ext\[quant\]"'):
            func(model)
    assert quant.require_bitsandbytes_if_4bit(plain) is False
    assert quant.prepare_4bit_for_laplace(plain) == 0

    # the module itself imports without bitsandbytes
    monkeypatch.delitem(sys.modules, "laplace_lora_ext.quant")
    fresh = importlib.import_module("laplace_lora_ext.quant")
    assert fresh is not quant and not fresh.bitsandbytes_available()


def test_missing_bitsandbytes_via_monkeypatched_check(monkeypatch):
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    with pytest.raises(ImportError, match="laplace-lora-ext"):
        quant.prepare_4bit_for_laplace(nn.Sequential(_FakeLinear4bit(4, 4)))


def test_check_lora_gradients_names_missing_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)  # a frozen "adapter": never reached by autograd
    model(torch.randn(5, 3)).sum().backward()
    named = list(model.named_parameters())

    with pytest.raises(RuntimeError) as info:
        quant.check_lora_gradients(named, "KronLaplace.fit", model=model)
    message = str(info.value)
    assert message.startswith("KronLaplace.fit: no gradient reached 2 parameter tensor(s)")
    assert "0.weight, 0.bias" in message and "1.weight" not in message
    assert "requires_grad=True" in message and "bitsandbytes" not in message  # not 4-bit

    quant.check_lora_gradients(named[2:], "ok")  # all present: no error


def test_missing_gradient_error_messages():
    names = [f"layer.{i}.lora_A.default.weight" for i in range(20)]
    err = quant.missing_gradient_error(names, "hooks", quantized_4bit=True)
    assert isinstance(err, RuntimeError)
    text = str(err)
    assert "20 parameter tensor(s)" in text and "(8 more)" in text
    assert "prepare_4bit_for_laplace" in text and "requires_grad=True" not in text
    unknown = str(quant.missing_gradient_error(names[:1], "hooks"))
    assert "prepare_4bit_for_laplace" in unknown and "requires_grad=True" in unknown
