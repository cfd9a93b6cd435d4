"""The result cache's step in infer: each event of a batch gets its result key; an event whose key is
in the cache is answered from it, and only the others are generated.

With a cache, events of one batch with the same key are generated once: the first copy is a "miss"
and is generated, the others are answered by its generation as "hit"s (and by its failure, if it
fails). What is generated is put in the cache at once, so the next batch hits it; records publishes
it to the cache topic beside its result (consumer/stages/records.py). Without a cache every event
is generated and marked "off".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from consumer.engine.adapters import DEFAULT_ADAPTER, AdapterVersion
from consumer.engine.base import EngineInfo, Generation
from consumer.events import CacheStatus
from consumer.images import LoadedImage
from consumer.result_cache.key import ResultKeyer
from consumer.result_cache.store import ResultCache, cache_entry
from consumer.settings import Settings
from consumer.stages.base import Described, Failed, Outcome, WorkItem

Ready = list[tuple[WorkItem, LoadedImage]]
"""Events of a batch whose image is ready, as infer holds them."""


class ResultStep:
    def __init__(
        self,
        settings: Settings,
        keyer: ResultKeyer,
        info: EngineInfo,
        cache: ResultCache | None = None,
        adapters: Callable[[str], AdapterVersion] | None = None,
    ) -> None:
        self.settings, self.keyer, self.info, self.cache = settings, keyer, info, cache
        self.adapters = adapters
        """The version each adapter name runs on now (the engine's `adapter_version`): an event is keyed by
        its own adapter's content. None: every event by the keyer's adapter (one adapter, never reloaded)."""

    def adapter_of(self, item: WorkItem) -> AdapterVersion | None:
        """The adapter version `item` would run on now; None where the engine does not say."""
        if self.adapters is None or item.event is None:
            return None
        return self.adapters(item.event.adapter or DEFAULT_ADAPTER)

    def key_of(self, item: WorkItem, loaded: LoadedImage, adapter: AdapterVersion | None = None) -> str | None:
        if loaded.content_hash is None or item.event is None:
            return None
        prompt = item.event.prompt or self.settings.prompt
        if adapter is None:
            return self.keyer.key(loaded.content_hash, prompt)
        return self.keyer.key(loaded.content_hash, prompt, adapter.hash)

    def answer(self, ready: Ready, generate: Callable[[Ready], list[Outcome]]) -> list[Outcome]:
        """Outcomes for `ready`: hits from the cache, the rest from `generate` (called once, with only
        the events that need the model; not at all when none does).

        A generated event is keyed by the adapter version it ran with: one reloaded between the lookup
        and the model call gets the new content's key."""
        adapters = {id(item): self.adapter_of(item) for item, _ in ready}
        keys = {id(item): self.key_of(item, loaded, adapters[id(item)]) for item, loaded in ready}
        if self.cache is None:
            return [self._keyed(self._rekeyed(outcome, keys, adapters), keys, "off") for outcome in generate(ready)]
        answered: list[Outcome] = []
        to_generate: Ready = []
        copies: dict[str, Ready] = {}
        for item, loaded in ready:
            key = keys[id(item)]
            if key is None:
                to_generate.append((item, loaded))
            elif key in copies:
                copies[key].append((item, loaded))
            elif (entry := self.cache.lookup(key)) is not None:
                generation = Generation(entry.description, entry.output_tokens, adapters[id(item)])
                answered.append(Described(item, loaded, generation, 0.0, 0, cache="hit", result_key=key))
            else:
                copies[key] = []
                to_generate.append((item, loaded))
        for outcome in generate(to_generate) if to_generate else []:
            copied = copies.get(keys[id(outcome.item)] or "", [])
            outcome = self._keyed(self._rekeyed(outcome, keys, adapters), keys, "miss")
            answered.append(outcome)
            key = keys[id(outcome.item)]
            if isinstance(outcome, Described) and key is not None:
                entry = cache_entry(outcome, self.info)
                if entry is not None:
                    self.cache.put(key, entry)
            for item, loaded in copied:
                if isinstance(outcome, Failed):
                    answered.append(Failed(item, outcome.error))
                    continue
                self.cache.count_hit()
                answered.append(Described(item, loaded, outcome.generation, 0.0, 0, cache="hit", result_key=key))
        return answered

    def _rekeyed(
        self, outcome: Outcome, keys: dict[int, str | None], adapters: dict[int, AdapterVersion | None]
    ) -> Outcome:
        """Key a generated event again when its adapter was reloaded after it was keyed."""
        item = outcome.item
        ran = outcome.generation.adapter if isinstance(outcome, Described) else None
        keyed = adapters.get(id(item))
        if ran is not None and keyed is not None and ran.hash != keyed.hash:
            keys[id(item)] = self.key_of(item, outcome.loaded, ran) if isinstance(outcome, Described) else None
        return outcome

    @staticmethod
    def _keyed(outcome: Outcome, keys: dict[int, str | None], cache: CacheStatus) -> Outcome:
        if isinstance(outcome, Failed):
            return outcome
        return replace(outcome, cache=cache, result_key=keys.get(id(outcome.item)))
