"""Does the default call path run on other causal LMs and LoRA set-ups? (robustness sweep)

The issue's held-out check runs the default call path on tasks and code this project has
not seen::

    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision()
    probs = la(batch, link_approx="mc")

This sweep runs exactly that on tiny random causal LMs of eight architectures (Llama, Qwen2,
Mistral, Phi-3 with its fused ``qkv_proj``, GPT-2 with its ``Conv1D`` ``c_attn``, OPT,
GPT-NeoX with its fused ``query_key_value``, Gemma) and, on Llama, seven LoRA set-ups
(``all-linear``, rsLoRA, LoRA on ``lm_head``, ``layers_to_transform``, Gaussian, PiSSA and
OLoRA initialisations), each wrapped in :class:`~laplace_lora_ext.LastTokenChoiceLM`, with
the structure and class count given. Each set-up is fine-tuned twice on 16 random-label
examples: to memorisation (the default's leave-one-out rule) and briefly (the evidence).
It records the training NLL, whether the predictive is finite and sums to one, the prior's
range, the warnings that name the prior, and any error. It checks that nothing crashes or
returns NaN, and that the fall-backs say what they do; with random labels there is nothing
to calibrate, so the numbers are not a calibration result::

    python -m benchmarks.default_path_sweep [--structure kron] [--classes 2]

Writes ``results/default_path_sweep_{structure}.{json,md}``. No downloads: the models are
built from configs.
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from typing import Any

import torch
import transformers as hf
from laplace import Laplace
from peft import LoraConfig, get_peft_model

import laplace_lora_ext  # noqa: F401
from benchmarks import _common as C
from laplace_lora_ext import LastTokenChoiceLM

VOCAB, CHOICE_IDS = 60, [5, 9, 13, 17]
QV = ["q_proj", "v_proj"]
#: architecture -> (config class, model class, extra config keywords, LoRA targets)
ARCHS: dict[str, tuple[str, str, dict, list[str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}, QV),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}, QV),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1}, QV),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, ["qkv_proj"]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}, ["c_attn"]),
    "opt": ("OPTConfig", "OPTForCausalLM", {"pad_token_id": 1}, QV),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, ["query_key_value"]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": 16}, QV),
}
#: characters of each warning that mentions the prior kept in the results
SAID = 160
#: LoRA set-up (on Llama) -> changes to the ``LoraConfig`` keywords
VARIANTS: dict[str, dict[str, Any]] = {
    "all-linear": {"target_modules": "all-linear"},
    "rslora": {"use_rslora": True},
    "lm_head": {"target_modules": [*QV, "lm_head"]},
    "layers_to_transform": {"layers_to_transform": [1]},
    "gaussian init": {"init_lora_weights": "gaussian"},
    "pissa init": {"init_lora_weights": "pissa"},
    "olora init": {"init_lora_weights": "olora"},
}


def tiny_causal_lm(arch: str) -> torch.nn.Module:
    """A random 2-layer causal LM of ``arch`` (hidden 64, 4 heads), float32."""
    config_cls, model_cls, extra, _ = ARCHS[arch]
    sizes = {"n_embd": 64, "n_layer": 2, "n_head": 4} if arch == "gpt2" else {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ("ffn_dim" if arch == "opt" else "intermediate_size"): 96,
    }  # fmt: skip
    scale = {"init_std": 0.2} if arch == "opt" else {"initializer_range": 0.2}
    config = getattr(hf, config_cls)(vocab_size=VOCAB, **sizes, **scale, **extra)
    return getattr(hf, model_cls)(config).float()


def random_batches(n: int, seed: int, classes: int) -> list[dict[str, torch.Tensor]]:
    """``n`` random prompts (half left-padded) with random labels, in batches of 8."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, VOCAB, (n, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[: n // 2, :2] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.randint(0, classes, (n,), generator=gen)
    return [
        {
            "input_ids": ids[i : i + 8],
            "attention_mask": mask[i : i + 8],
            "labels": labels[i : i + 8],
        }
        for i in range(0, n, 8)
    ]


def fine_tuned(arch: str, lora: dict, memorise: bool, classes: int) -> tuple[Any, list, float]:
    """The wrapped LoRA model fine-tuned on 16 examples (Adam), its batches and training
    NLL."""
    torch.manual_seed(0)
    config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ARCHS[arch][3]}
    config |= {"fan_in_fan_out": True} if arch == "gpt2" else {}
    model = LastTokenChoiceLM(
        get_peft_model(tiny_causal_lm(arch), LoraConfig(**config | lora)), CHOICE_IDS[:classes]
    )
    train = random_batches(16, 1, classes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2 if memorise else 3e-3)
    model.train()
    for _ in range(1000 if memorise else 10):
        for batch in train:
            loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        nll = sum(
            torch.nn.functional.cross_entropy(model(b), b["labels"], reduction="sum").item()
            for b in train
        )
    return model, train, nll / 16


def default_path(model: Any, train: list, structure: str, classes: int) -> dict:
    """The issue's default call path; what came out and what it said."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure=structure)
        la.fit(train)
        la.optimize_prior_precision()
        probs = torch.cat([la(b, link_approx="mc") for b in random_batches(16, 2, classes)])
    prior = la.prior_precision
    said = {str(w.message)[:SAID] for w in caught if "prior" in str(w.message).lower()}
    return {
        "probs_ok": bool(torch.isfinite(probs).all())
        and bool(torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-4)),
        "prior_min": float(prior.min()),
        "prior_max": float(prior.max()),
        "warnings": sorted(said),
    }


def one_case(arch: str, variant: str, memorise: bool, structure: str, classes: int) -> dict:
    row: dict[str, Any] = {"arch": arch, "variant": variant, "memorised_run": memorise}
    try:
        model, train, nll = fine_tuned(arch, VARIANTS.get(variant, {}), memorise, classes)
        row |= {"train_nll": nll} | default_path(model, train, structure, classes)
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        where = traceback.extract_tb(e.__traceback__)[-1]
        row["error"] = f"{type(e).__name__}: {str(e)[:300]} ({where.filename}:{where.lineno})"
    return row


def _cut(warning: str) -> str:
    """A recorded warning (its first :data:`SAID` characters) for a table cell."""
    return warning + ("…" if len(warning) >= SAID else "")


def render(rows: list[dict], structure: str, classes: int) -> str:
    lines = [
        f"# The default call path on other causal LMs and LoRA set-ups ({structure}, "
        f"{classes} classes)",
        "",
        "`python -m benchmarks.default_path_sweep`: tiny random models, 16 random-label "
        "examples; a robustness check, not a calibration result.",
        "",
        "| architecture | LoRA | fine-tuning | train NLL | predictive finite, sums to 1 "
        "| prior range | what it said about the prior |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        run = "to memorisation" if r["memorised_run"] else "brief"
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['variant']} | {run} | | **error** | | {r['error']} |")
            continue
        said = " / ".join(_cut(w) for w in r["warnings"]) or "nothing"
        lines.append(
            f"| {r['arch']} | {r['variant']} | {run} | {r['train_nll']:.2g} | "
            f"{'yes' if r['probs_ok'] else '**no**'} | {r['prior_min']:.3g}–{r['prior_max']:.3g} "
            f"| {said} |"
        )
    n_ok = sum(r.get("probs_ok", False) for r in rows)
    return "\n".join([*lines, "", f"{n_ok} of {len(rows)} runs gave a finite predictive."]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--structure", default="kron", choices=["kron", "diag", "full"])
    p.add_argument("--classes", type=int, default=2, choices=[2, 3, 4])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = [(a, "plain") for a in ARCHS] + [("llama", v) for v in VARIANTS]
    rows = []
    for arch, variant in cases:
        for memorise in (True, False):
            rows.append(one_case(arch, variant, memorise, args.structure, args.classes))
            print(rows[-1], flush=True)
    name = f"default_path_sweep_{args.structure}"
    payload = {"args": vars(args), "rows": rows}
    C.write_results(name, payload, render(rows, args.structure, args.classes))


if __name__ == "__main__":
    main()
