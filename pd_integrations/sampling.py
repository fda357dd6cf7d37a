"""Choosing each next token: transformers' logits processors and stopping criteria, OpenAI's
repetition penalties and logit bias, and stop strings cut from streamed text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 2.0  # OpenAI's range for frequency_penalty and presence_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # and for each logit_bias value: [-100, 100]
MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs range: [0, 20]


@dataclass(frozen=True)
class Penalties:
    """What discourages (or encourages) tokens, applied to the logits before the grammar's mask and the warpers.

    `frequency_penalty` and `presence_penalty` as OpenAI defines them: token j's logit minus
    `c[j] * frequency_penalty + (c[j] > 0) * presence_penalty`, where c[j] counts j in the output so far (not the
    prompt). `repetition_penalty` as transformers' (CTRL's): the logit of every token in the prompt or output so
    far divided by it when positive, multiplied when negative; 1 is off. `logit_bias`: token id -> a number added
    to its logit. Built by `pd_integrations.inputs.SamplingParams.penalties`, which checks them.
    """

    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def processors(self) -> list[LogitsProcessor]:
        """The logits processors of the penalties that are on."""
        processors: list[LogitsProcessor] = []
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty)))
        if self.frequency_penalty or self.presence_penalty:
            processors.append(OutputPenaltyLogitsProcessor(self.frequency_penalty, self.presence_penalty))
        if self.logit_bias:
            processors.append(LogitBiasLogitsProcessor(self.logit_bias))
        return processors


class OutputPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the tokens generated so far. One per generation: the first
    sequence it sees is the prompt, whose tokens it does not count."""

    def __init__(self, frequency_penalty: float, presence_penalty: float):
        self.frequency, self.presence = float(frequency_penalty), float(presence_penalty)
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        output = input_ids[0, self.prompt_length :]
        if not output.numel():
            return scores
        counts = torch.bincount(output, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
        return scores - (counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence)[None]


class LogitBiasLogitsProcessor(LogitsProcessor):
    """Adds a fixed bias to the logits of chosen token ids (OpenAI's `logit_bias`)."""

    def __init__(self, logit_bias: Mapping[int, float]):
        self.ids = torch.tensor(list(logit_bias), dtype=torch.long)
        self.bias = torch.tensor(list(logit_bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids.to(scores.device)] += self.bias.to(scores.device, scores.dtype)
        return scores


class Constraint(Protocol):
    """Which tokens may come next, for output that must follow a grammar (JSON schema, regex, tool call): one
    object per generation, holding its own matcher state. See `pd_integrations.constraints`."""

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [1, vocab] (float32) with every token the grammar forbids next set to -inf."""

    def advance(self, token: int) -> None:
        """Accept the chosen `token`."""

    def is_finished(self) -> bool:
        """Whether the output is complete (generation stops there, finish reason "stop")."""


@dataclass
class Sampler:
    """Greedy when `temperature == 0`, else temperature / top-k / top-p sampling seeded by `seed`; stops at EOS or
    a stop string. Built by `SamplingParams.sampler`."""

    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    generator: torch.Generator | None
    greedy: bool
    stops: list[str]
    constraint: Constraint | None = None
    penalties: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    logprobs: int | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        tokenizer,
        eos_ids: list[int],
        device: torch.device,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        stops: list[str],
        constraint: Constraint | None,
        penalties: Penalties,
        logprobs: int | None,
    ) -> Sampler:
        """One generation's sampler from checked settings (see `SamplingParams.sampler`)."""
        processors = LogitsProcessorList()
        if temperature > 0:
            processors.append(TemperatureLogitsWarper(float(temperature)))  # it refuses an int
            if top_k > 0:
                processors.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        criteria = StoppingCriteriaList([EosTokenCriteria(eos_ids)] if eos_ids else [])
        if stops:
            criteria.append(StopStringCriteria(tokenizer, stops))
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        return cls(
            processors,
            criteria,
            generator,
            temperature == 0,
            stops,
            constraint,
            LogitsProcessorList(penalties.processors()),
            logprobs,
        )

    def next_token(self, sequence: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """`sequence` [1, t] extended by the token chosen from next-token `logits` [vocab], and whether a stopping
        criterion (EOS, a stop string, a finished constraint) ends generation with it."""
        # Penalties first, as OpenAI applies them to the logits; then the grammar's mask, so that no bias lets a
        # forbidden token through; then the warpers, so that top-k/top-p choose among allowed tokens.
        scores = self.penalties(sequence, logits[None].float())
        if self.constraint is not None:
            scores = self.constraint.mask(scores)
        scores = self.processors(sequence, scores)
        if self.greedy:
            token = scores[0].argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator)[0]
        if self.logprobs is not None:
            self.token_logprobs.append(TokenLogprob.of(logits, int(token), self.logprobs))
        sequence = torch.cat([sequence, token[None]], dim=-1)
        stopped = bool(self.criteria(sequence, scores)[0])
        if self.constraint is not None:
            self.constraint.advance(int(token))
            stopped = stopped or self.constraint.is_finished()
        return sequence, stopped


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability and the `top` most likely tokens' (id, log probability), under the
    model's own next-token distribution (before penalties, the grammar's mask and temperature), as OpenAI's
    `logprobs` report them."""

    token: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def of(cls, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), -1)
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
        return cls(token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))


class TextDeltas:
    """One sequence's output text as its tokens arrive: decoded, cut before the first stop string, and handed out as
    deltas that hold back a tail that may still grow into a stop string (or an incomplete character)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text, self.emitted = "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """The new emittable text after `token`, and whether the text reached a stop string (then it is cut
        before it and complete: `flush` hands out the rest)."""
        self.tokens.append(token)
        self.text, cut = cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stops)
        if cut:
            return "", True
        safe = safe_length(self.text, self.stops)
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = self.text[self.emitted : safe], safe
        return delta, False

    def flush(self) -> str:
        """The text not handed out yet (at the end of generation)."""
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be emitted: hold back a tail that may still grow into a stop string, and an
    incomplete UTF-8 character."""
    safe = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                safe = min(safe, len(text) - k)
                break
    if text.endswith("\ufffd"):
        safe = min(safe, len(text) - 1)
    return safe
