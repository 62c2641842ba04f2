"""Token blocks for the language-model study: every document tokenised, joined with the end-of-text token and cut
into blocks of `Budget.block` tokens (the remainder dropped). Measured sets take blocks evenly spaced across their
collection, so a set samples the whole collection and not its first pages."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .plan import Budget, Method
from .texts import Corpora


def token_blocks(tokenizer, documents: list[str], block: int) -> torch.Tensor:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
    count = len(ids) // block
    if count == 0:
        raise ValueError(f"{len(documents)} documents hold {len(ids)} tokens, fewer than one block of {block}.")
    return torch.tensor(ids[: count * block], dtype=torch.long).view(count, block)


def spaced(blocks: torch.Tensor, count: int, name: str) -> torch.Tensor:
    if blocks.shape[0] < count:
        raise ValueError(f"The {name} text holds {blocks.shape[0]} blocks; the study measures {count}.")
    index = torch.linspace(0, blocks.shape[0] - 1, count).round().long()
    return blocks[index]


@dataclass
class StudyData:
    train: torch.Tensor
    general: torch.Tensor
    target: torch.Tensor  # measured target blocks; the first `kl_blocks` of them also give the KL
    retention: dict[str, torch.Tensor]

    @classmethod
    def build(cls, tokenizer, corpora: Corpora, budget: Budget) -> "StudyData":
        def blocks(documents):
            return token_blocks(tokenizer, documents, budget.block)

        return cls(train=blocks(corpora.train), general=blocks(corpora.general),
                   target=spaced(blocks(corpora.target), budget.eval_blocks, "target"),
                   retention={name: spaced(blocks(docs), budget.eval_blocks, name)
                              for name, docs in corpora.retention.items()})

    def heal_blocks(self, budget: Budget) -> torch.Tensor:
        """General text for healing, in a fixed order; the replay blocks are drawn from what healing did not use."""
        needed = budget.heal_steps * budget.batch_size
        if self.general.shape[0] < needed:
            raise ValueError(f"Healing needs {needed} blocks of general text; there are {self.general.shape[0]}.")
        return self.general[:needed]

    def training_blocks(self, method: Method, seed: int, budget: Budget) -> tuple[torch.Tensor, float]:
        """The run's sequences: `steps x batch_size` Old Testament blocks drawn by the seed, of which a `replay`
        fraction (rounded up: at least one sequence when asked for) is replaced by general text healing did not see.
        Returns the blocks and the replayed fraction actually used."""
        total = budget.steps * budget.batch_size
        rng = random.Random(seed)
        chosen = self.train[rng.sample(range(self.train.shape[0]), total)]
        replayed = math.ceil(method.replay * total) if method.replay else 0
        if replayed:
            pool = self.general[budget.heal_steps * budget.batch_size:]
            if pool.shape[0] < replayed:
                raise ValueError(f"Replay needs {replayed} unused general blocks; there are {pool.shape[0]}.")
            slots = rng.sample(range(total), replayed)
            chosen[slots] = pool[rng.sample(range(pool.shape[0]), replayed)]
        return chosen, replayed / total
