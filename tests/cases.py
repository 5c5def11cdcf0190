"""The tiny models of the core tests, each with matching random data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.models import random_batch, tiny_gpt2, tiny_llama, tiny_roberta


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    include_extra_params: bool


def make_case(name: str, n: int = 7, T: int = 6) -> Case:
    if name == "llama":
        return Case(name, tiny_llama(), random_batch(n, T, 3, "left"), False)
    if name == "llama_lm_head":
        return Case(name, tiny_llama(lm_head=True), random_batch(n, T, 3, "right"), False)
    if name == "gpt2":
        return Case(name, tiny_gpt2(), random_batch(n, T, 3, "right", pad_id=0), True)
    if name == "roberta":
        return Case(name, tiny_roberta(), random_batch(n, T, 2, "right", pad_id=1), True)
    raise KeyError(name)


CASES = ["llama", "llama_lm_head", "gpt2", "roberta"]
