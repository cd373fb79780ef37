"""lm-evaluation-harness bridge: any lm-eval task on a Caprese model, with its phases intact.

lm-eval's own HF backend scores a (context, continuation) pair with one cache-less forward,
which Caprese would read as a prompt made of the whole text (all dense). This backend scores
it the way generation would see it: the context is the prompt (dense prefill, it sets the
method's selection or threshold) and the continuation is decoded (compressed + low-rank),
teacher-forced in one forward with `caprese.split`. Generation tasks go through
`model.generate` (dense prefill, compressed decode). lm-eval is an optional dependency:
`pip install lm-eval`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from caprese.families import decoder, logits
from caprese.generation import GenerationSettings, generate
from caprese.phases import split
from caprese.samples import right_padded


class CapreseLM(TemplateLM):
    """An lm-eval LM around a loaded model (full, method alone or Caprese: whatever is attached).

    Use it as `lm_eval.simple_evaluate(model=CapreseLM(model, tokenizer), tasks=[...])`, or
    from the command line as `caprese lm-eval`.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) per request.

        The logits at the last context position (prefill, as for the first generated token)
        predict the first continuation token; later ones come from decode positions.
        """
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stack = decoder(self.model)
        results = []
        starts = range(0, len(requests), self.batch_size)
        for start in tqdm(starts, desc="caprese loglikelihood", disable=disable_tqdm):
            rows = []
            for _, context, continuation in requests[start:start + self.batch_size]:
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                scored = min(len(continuation), len(whole) - 1)
                rows.append((whole[:-1], whole[len(whole) - scored:]))
            batch = right_padded([inputs for inputs, _ in rows],
                                  [len(inputs) - len(target) + 1 for inputs, target in rows], pad)
            batch = batch.to(self._device)
            with split(self.model, batch.boundary):
                hidden = stack(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False).last_hidden_state
            for row, (inputs, target) in enumerate(rows):
                positions = slice(len(inputs) - len(target), len(inputs))
                log_probs = logits(self.model, hidden[row, positions]).float().log_softmax(-1)
                wanted = torch.tensor(target, device=log_probs.device)
                score = float(log_probs.gather(1, wanted[:, None]).sum())
                greedy = bool((log_probs.argmax(-1) == wanted).all())
                results.append((score, greedy))
                self.cache_hook.add_partial("loglikelihood", requests[start + row][0],
                                            (score, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: disjoint windows, each window's context is its prompt."""
        results = []
        for request in tqdm(requests, desc="caprese rolling", disable=disable_tqdm):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                disable_tqdm=True)
            results.append(sum(score for score, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) generation until a stop string, grouped by generation settings."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(index)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            options = dict(requests[indices[0]].args[1])
            until = options.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            sampling = options.pop("do_sample", False)
            settings = GenerationSettings(
                max_new_tokens=options.pop("max_gen_toks", self.max_gen_toks),
                batch_size=self.batch_size,
                temperature=options.pop("temperature", 0.0) if sampling else 0.0,
                top_p=options.pop("top_p", 1.0) if sampling else 1.0,
                stop=tuple([until] if isinstance(until, str) else until))
            contexts = [requests[i].args[0] for i in indices]
            completions = generate(self.model, self.tokenizer, contexts, settings,
                                   desc="caprese generate")
            for i, samples in zip(indices, completions, strict=True):
                outputs[i] = samples[0].text
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs
