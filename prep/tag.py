"""`sdprep tag`: WD14 scores (and optional VLM captions) into sidecars, captions derived from them.

Per image the stage keeps, under the sidecar's "sdprep" key:
- "wd14": the raw scores of every tag above a floor, with the model id (taggers/wd14.py);
- "caption": a VLM's raw answer with the captioner and prompt that made it (taggers/captions_text.py);
- "tag": the settings that produced the caption file, the text written and the caption it replaced.

The caption file is a pure function of those records and the options (taggers/rules.py), so a
second run with other thresholds rewrites captions without running any model, and a run with the
same options does nothing. Decoding and preprocessing run in worker threads (`map_items`) ahead of
inference, a bounded window at a time; results are written per batch, so an interrupted run resumes.
With a Ray executor, reading and inference both run on the cluster's workers (`_TagWork`) and the
results are written here the same way.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdprep.config import bounded, check_bounds
from sdprep.dataset import (
    Item,
    dump_sidecar,
    read_caption,
    read_sidecar,
    sdprep_meta,
)
from sdprep.errors import ConfigError, ModelError, SdprepError, unknown_choice
from sdprep.executors import Executor
from sdprep.prep import lineage
from sdprep.prep.captions import CaptionWriter
from sdprep.progress import NullReporter, Reporter
from sdprep.stage import MAX_WORKERS, StageResult, dataset_items, map_items, progress, worker_count
from sdprep.taggers.base import Captioner
from sdprep.taggers.registry import create_tagger, load_captioner
from sdprep.taggers.rules import MERGE_POLICIES, CaptionRules, caption_from_scores, merge_caption
from sdprep.taggers.wd14 import DEFAULT_FLOOR, DEFAULT_MODEL, DEFAULT_SIZE, WD14Tagger, matches_record

TAGS_ONLY_TEMPLATE = "{tags}"
MAX_CAPTION_FAILURES = 8  # in a row: the captioner is down, stop


@dataclass(frozen=True)
class TagOptions:
    """Options of `run_tag`. `caption_template` None means `{tags}`, or the VLM default with a captioner."""

    model: str = DEFAULT_MODEL
    rules: CaptionRules = field(default_factory=CaptionRules)
    merge: str = "replace"
    recursive: bool = False
    shard: tuple[int, int] | None = None  # (K, N), 1-based
    batch_size: int = bounded(4, 1)
    workers: int = bounded(0, 0, MAX_WORKERS)  # 0 = auto: half a batch, at least 2, decoding ahead
    force: bool = False
    floor: float = DEFAULT_FLOOR
    device: str = "auto"
    captioner: str | None = None
    captioner_options: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    caption_template: str | None = None
    trigger: str = ""
    boilerplate: tuple[str, ...] | None = None  # None = captions_text.DEFAULT_BOILERPLATE

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.merge not in MERGE_POLICIES:
            raise unknown_choice("merge policy", self.merge, MERGE_POLICIES)
        if not 0 < self.floor < 1:
            raise ConfigError(f"score floor must be between 0 and 1, got {self.floor}")
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self.rules, name)
            if value < self.floor and not self.rules.mcut:
                raise ConfigError(
                    f"{name.replace('_', '-')} {value} is below the stored score floor {self.floor}",
                    "scores under the floor are not kept; lower --score-floor (and use --force) too",
                )
        if self.shard is not None:
            k, n = self.shard
            if not 1 <= k <= n:
                raise ConfigError(f"shard {k}/{n} is out of range", "write --shard K/N with 1 <= K <= N")


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N), 1-based."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(
            f'shard "{text}" is not K/N', "for example --shard 1/4 (the first of 4 parts)"
        ) from None
    if not 1 <= k <= n:
        raise ConfigError(f"shard {text} is out of range", "write --shard K/N with 1 <= K <= N")
    return k, n


def in_shard(item: Item, root: Path, shard: tuple[int, int] | None) -> bool:
    """Stable assignment by the image's path relative to the dataset (same on every machine)."""
    if shard is None:
        return True
    k, n = shard
    rel = item.path.relative_to(root).as_posix()
    return zlib.crc32(rel.encode("utf-8")) % n == k - 1


@dataclass
class Prepared:
    """One image, read by a worker thread: its sidecar, caption, and pixels when a model must run."""

    item: Item
    sidecar: dict[str, Any]
    caption: str | None = None
    pixels: np.ndarray | None = None  # WD14 input (uint8 HWC, BGR)
    image: Image.Image | None = None  # for the captioner
    need_wd14: bool = False
    need_vlm: bool = False
    skip: bool = False
    record: dict[str, Any] | None = None  # new WD14 scores (`_TagWork.infer`)
    vlm: str | SdprepError | None = None  # the captioner's answer, or why it failed
    notes: list[str] = field(default_factory=list)  # what ran the model (provider, warnings)


class _TagWork:
    """Where the models run: read an image (`prepare`, in threads), then WD14 and the captioner over a
    batch (`infer`). Nothing is written here; `_Tagging` writes what comes back. With a remote
    executor the whole object goes to each Ray worker (`batch`), where the tagger and captioner, sent
    as their recipes, load once."""

    def __init__(
        self,
        opts: TagOptions,
        tagger: WD14Tagger,
        captioner: Captioner | None,
        prompt: str,
        settings: dict[str, Any],
        chain: Sequence[str],
    ) -> None:
        self.opts, self.tagger, self.captioner = opts, tagger, captioner
        self.prompt, self.settings = prompt, settings
        self.model_id = tagger.model_id
        self.earlier, self.later = lineage.around(chain, "tag")

    def prepare(self, item: Item) -> Prepared:
        """Read what an image needs; decode and preprocess it only when a model must run."""
        from sdprep.taggers.captions_text import caption_matches

        sidecar = read_sidecar(item)
        found = sidecar.get("sdprep")
        meta: dict[str, Any] = found if isinstance(found, dict) else {}
        force = self.opts.force
        p = Prepared(item, sidecar)
        p.need_wd14 = force or not matches_record(meta.get("wd14"), self.model_id, self.opts.floor)
        if self.captioner is not None:
            settings = getattr(self.captioner, "settings", None)
            done = caption_matches(meta.get("caption"), self.captioner.name, self.prompt, settings)
            p.need_vlm = force or not done
        previous = meta.get("tag")
        p.caption = read_caption(item)
        if (
            not (p.need_wd14 or p.need_vlm)
            and isinstance(previous, dict)
            and previous.get("settings") == self.settings
            and p.caption is not None
            and not _caption_pending(previous, p.caption)
            and self.still_mine(meta, p.caption)
        ):
            p.skip = True
            return p
        if p.need_wd14 or p.need_vlm:
            from sdprep.images import load_image
            from sdprep.taggers.wd14 import preprocess

            image = load_image(item.path, "RGB", background=(255, 255, 255), root=item.root)
            if p.need_wd14:
                size = self.tagger.size if self.tagger.session else DEFAULT_SIZE
                p.pixels = preprocess(image, size)
            if p.need_vlm:
                p.image = image
        return p

    def still_mine(self, meta: dict[str, Any], caption: str) -> bool:
        """False when a stage before tag in the chain rewrote the caption since tag built it: tag
        builds on that output again. Own output, and hand edits, stay as they are."""
        if lineage.derived_from(meta, "tag", caption, self.later):
            return True
        return lineage.written_by(meta, caption) not in self.earlier

    def infer(self, batch: list[Prepared]) -> None:
        """WD14 scores (`record`) and captions (`vlm`) for a batch of prepared images."""
        todo = [p for p in batch if p.need_wd14]
        if todo:
            from sdprep.taggers.wd14 import preprocess, to_batch

            self.tagger.load()
            size = self.tagger.size
            pixels = [
                p.pixels
                if p.pixels is not None and p.pixels.shape[0] == size
                else _resize_for(p, size, preprocess)
                for p in todo
            ]
            probs = self.tagger.infer(to_batch(pixels))
            notes = [f"wd14: {self.tagger.model_id} on {self.tagger.provider}", *self.tagger.warnings]
            for p, row in zip(todo, probs):
                p.record = self.tagger.record(row)
                p.pixels = None
                p.notes = notes
        self._caption([p for p in batch if p.need_vlm])

    def _caption(self, todo: list[Prepared]) -> None:
        """VLM answers (or errors) into `vlm`; a failed batch is retried image by image."""
        captioner = self.captioner
        if not todo or captioner is None:  # an image needs the captioner only when there is one
            return
        from sdprep.taggers.captions_text import render_prompt

        images = [p.image for p in todo if p.image is not None]  # `prepare` decoded each one
        if len(images) != len(todo):
            raise RuntimeError("tag: an image to caption was not decoded")
        plain = dataclasses.replace(self.opts.rules, escape_parentheses=False)
        prompts = []
        for p in todo:
            record = p.record or sdprep_meta(p.sidecar).get("wd14")
            tags = caption_from_scores(record, plain) if record else ""
            prompts.append(render_prompt(self.prompt, tags=tags, trigger=self.opts.trigger))
        try:
            for p, text in zip(todo, captioner.caption(images, prompts)):
                p.vlm = text
        except SdprepError as exc:
            partial = getattr(exc, "partial", None) or []  # answers that arrived before the failure
            for p, text in zip(todo, partial):
                if isinstance(text, str):
                    p.vlm = text
            for p, image, prompt in zip(todo, images, prompts):
                if p.vlm is not None:
                    continue
                if len(todo) == 1:
                    p.vlm = exc
                    continue
                try:  # one by one, so one bad image (or a flaky server) fails only itself
                    p.vlm = captioner.caption([image], [prompt])[0]
                except SdprepError as one:
                    p.vlm = one
        for p in todo:
            p.image = None

    def threads(self) -> int:
        """Decoding threads: --workers, or by default half a batch and at least 2 (4 images each
        ahead: two batches)."""
        return worker_count(self.opts.workers, max(2, -(-self.opts.batch_size // 2)))

    def batch(self, items: list[Item]) -> list[Prepared | SdprepError]:
        """`prepare` each item (per-file errors as values), then `infer` in --batch-size steps: what a
        remote worker runs for one batch of items."""
        got = [out for _, out in map_items(self.prepare, items, self.threads())]
        todo = [p for p in got if isinstance(p, Prepared) and not p.skip and (p.need_wd14 or p.need_vlm)]
        size = self.opts.batch_size
        for i in range(0, len(todo), size):
            self.infer(todo[i : i + size])
        return got

    def __call__(self, item: Item) -> Prepared:
        got = self.batch([item])[0]
        if isinstance(got, SdprepError):
            raise got
        return got


class _Tagging:
    """The state of one `run_tag` call: options, lazily built models, the caption writer."""

    def __init__(
        self,
        root: Path,
        opts: TagOptions,
        report: Reporter,
        tagger: WD14Tagger | None,
        captioner: Captioner | None,
        chain: Sequence[str] = (),
        executor: Executor | None = None,
    ) -> None:
        self.root, self.opts, self.report = root, opts, report
        self.executor = executor
        self.later = lineage.around(chain, "tag")[1]
        self.rules = opts.rules
        if tagger is None:  # built through the registry now, loaded on the first image that needs it
            made = create_tagger(opts.model, device=opts.device, floor=opts.floor)
            if not isinstance(made, WD14Tagger):  # tag reads WD14's scores, sizes and sidecar record
                raise ConfigError(f"--model {opts.model}: sdprep tag runs WD14 models only ({made.name})")
            tagger = made
        self.model_id = tagger.model_id
        self.captioner = captioner
        if self.captioner is None and opts.captioner:
            self.captioner = load_captioner(opts.captioner, **opts.captioner_options)
        self.template = self._template()
        self._check_templates()
        self.settings = self._settings()
        self.work = _TagWork(opts, tagger, self.captioner, self.prompt, self.settings, chain)
        self.result = StageResult("tag")
        self.counts = {"inferred": 0, "captioned": 0, "captions_written": 0}
        self.writer = CaptionWriter(root, "tag")
        self._streak = 0  # captioner failures in a row

    # -- options -----------------------------------------------------------------------------
    def _template(self) -> str:
        from sdprep.taggers.captions_text import DEFAULT_CAPTION_TEMPLATE

        if self.opts.caption_template is not None:
            return self.opts.caption_template
        return DEFAULT_CAPTION_TEMPLATE if self.captioner is not None else TAGS_ONLY_TEMPLATE

    def _check_templates(self) -> None:
        from sdprep.taggers.captions_text import DEFAULT_PROMPT, check_caption_template, check_prompt

        check_caption_template(self.template)
        self.prompt = self.opts.prompt or DEFAULT_PROMPT
        check_prompt(self.prompt)
        if self.opts.prompt and self.captioner is None:
            raise ConfigError("--prompt needs --captioner", "add --captioner hf:REPO or openai:URL")

    def _settings(self) -> dict[str, Any]:
        """Everything that shapes the caption file; a change re-derives captions from stored records."""
        from sdprep.taggers.captions_text import DEFAULT_BOILERPLATE

        self.boilerplate = self.opts.boilerplate if self.opts.boilerplate is not None else DEFAULT_BOILERPLATE
        settings: dict[str, Any] = {
            "model": self.model_id,
            "rules": self.rules.to_dict(),
            "merge": self.opts.merge,
            "template": self.template,
        }
        if "{trigger}" in self.template:
            settings["trigger"] = self.opts.trigger
        if "{caption}" in self.template:
            settings["boilerplate"] = list(self.boilerplate)
        if self.captioner is not None:
            settings["captioner"] = self.captioner.name
            settings["prompt"] = self.prompt
        return settings

    # -- where the models run ----------------------------------------------------------------
    def _done(self, items: list[Item]) -> Iterator[tuple[Item, Prepared | SdprepError]]:
        """Each item with its models run: here (decoding in threads ahead of inference on batches,
        images without model work as soon as they are read), or on the executor's workers."""
        opts = self.opts
        if self.executor is not None and not self.executor.local:
            yield from self.executor.map(self.work, items, gpu=True, batch_size=opts.batch_size)
            return
        workers = self.work.threads()
        batch: list[Prepared] = []
        for item, got in map_items(self.work.prepare, items, workers):
            if isinstance(got, SdprepError) or got.skip or not (got.need_wd14 or got.need_vlm):
                yield item, got
                continue
            batch.append(got)
            if len(batch) >= opts.batch_size:
                self.work.infer(batch)
                yield from ((p.item, p) for p in batch)
                batch = []
        if batch:
            self.work.infer(batch)
            yield from ((p.item, p) for p in batch)

    # -- main thread -------------------------------------------------------------------------
    def run(self, items: list[Item]) -> StageResult:
        ran = 0  # images that went through a model since the writer last wrote
        # the writer writes what is finished when the run ends, even on Ctrl-C
        with progress(self.report, len(items), "tag"), self.writer:
            for item, got in self._done(items):
                if isinstance(got, SdprepError):
                    self._fail(item, got)
                elif got.skip:
                    self.result.skipped += 1
                    self.report.advance()
                elif got.need_wd14 or got.need_vlm:
                    self._model_done(got)
                    ran += 1
                    if ran >= self.opts.batch_size:
                        self.writer.flush()  # a model's work is kept batch by batch
                        self._check_streak()
                        ran = 0
                else:
                    self._finish(got)
            self._check_streak()
        line = self.executor.summary() if self.executor is not None else None
        if line:
            self.result.notes.append(line)
        self._summarise()
        return self.result

    def _fail(self, item: Item, exc: SdprepError) -> None:
        self.result.fail_error(item.path, exc)
        self.report.advance()

    def _model_done(self, p: Prepared) -> None:
        """Write what the models made of one image; a failed caption keeps the new scores."""
        self.result.notes += [n for n in p.notes if n not in self.result.notes]
        self.counts["inferred"] += p.record is not None
        if p.need_vlm:
            self.counts["captioned"] += isinstance(p.vlm, str)
            self._streak = self._streak + 1 if isinstance(p.vlm, SdprepError) else 0
        if isinstance(p.vlm, SdprepError):
            if p.record is not None:  # keep the scores: the next run only needs the captioner
                sdprep_meta(p.sidecar)["wd14"] = p.record
                self.writer.write(p.item.sidecar_path, dump_sidecar(p.sidecar))
            self._fail(p.item, p.vlm)
            return
        self._finish(p, p.record, p.vlm)

    def _check_streak(self) -> None:
        """Stop when the captioner keeps failing (a server that is down), instead of retrying 10,000 times."""
        if self._streak >= MAX_CAPTION_FAILURES and self.captioner is not None:  # streaks need one
            last = self.result.failed[-1].reason if self.result.failed else "?"
            raise ModelError(
                f"captioner {self.captioner.name} failed {self._streak} images in a row (last: {last})",
                "check that the server or model works; finished images are kept, run again to resume",
            )

    def _finish(self, p: Prepared, record: dict[str, Any] | None = None, vlm_text: str | None = None) -> None:
        """Store new records, derive the caption file, queue what changed (caption before sidecar)."""
        from sdprep.taggers.captions_text import caption_record

        meta = sdprep_meta(p.sidecar)
        mine = lineage.derived_from(meta, "tag", p.caption, self.later)
        old = {key: meta.get(key) for key in ("wd14", "caption", "tag")}
        if record is not None:
            meta["wd14"] = record
        if vlm_text is not None and self.captioner is not None:  # only a captioner gives vlm_text
            settings = getattr(self.captioner, "settings", None)
            meta["caption"] = caption_record(vlm_text, self.captioner.name, self.prompt, settings)
        text = derived_caption(meta, self.rules, self.template, self.opts.trigger, self.boilerplate)
        previous = old["tag"] if isinstance(old["tag"], dict) else {}
        base = previous.get("base") if mine else p.caption
        new = merge_caption(base, text, self.opts.merge, self.rules.separator)
        if mine and p.caption is not None and new == previous.get("written") and p.caption != new:
            new = p.caption  # a later stage built on this same output: leave its caption
        else:
            meta["tag"] = {"settings": self.settings, "written": new}
            if base is not None:
                meta["tag"]["base"] = base
        changed = False
        # The sidecar first: it records the caption being replaced ("base"). Killed between the two
        # writes, a re-run finds the old caption and that record and writes the caption; the other
        # order would record the new caption as the base and lose the old one.
        if not os.path.exists(p.item.sidecar_path) or any(meta.get(k) != v for k, v in old.items()):
            self.writer.write(p.item.sidecar_path, dump_sidecar(p.sidecar))
            changed = True
        if new != p.caption or not p.item.caption_path.exists():
            self.writer.write(p.item.caption_path, new.strip() + "\n")
            self.counts["captions_written"] += 1
            changed = True
        if changed:
            self.result.changed += 1
        else:
            self.result.skipped += 1
        self.report.advance()

    def _summarise(self) -> None:
        c = self.counts
        self.result.details.update(c)
        self.result.notes.append(
            f"  {c['inferred']} images through WD14, {c['captioned']} through the captioner, "
            f"{c['captions_written']} caption files written"
        )


def derived_caption(
    meta: dict[str, Any],
    rules: CaptionRules,
    template: str,
    trigger: str,
    boilerplate: tuple[str, ...] | list[str],
) -> str:
    """The caption `tag` derives from an image's stored records (WD14 scores through the one
    score rule, the VLM caption), before it is merged with an existing caption."""
    from sdprep.taggers.captions_text import clean_caption, combine_caption

    tags = caption_from_scores(meta["wd14"], rules)
    vlm = meta.get("caption", {}).get("text", "") if "{caption}" in template else ""
    vlm = clean_caption(vlm, boilerplate) if vlm else ""
    return combine_caption(template, trigger=trigger, tags=tags, caption=vlm)


def _caption_pending(previous: dict[str, Any], caption: str) -> bool:
    """True when a run stopped between writing the sidecar and the caption: the caption file still
    holds the text the recorded caption replaces (a hand edit would differ from both)."""
    base = previous.get("base")
    return base is not None and base != previous.get("written") and caption == base


def _resize_for(p: Prepared, size: int, preprocess: Callable[[Image.Image, int], np.ndarray]) -> np.ndarray:
    """A model whose input is not 448: redo the preprocessing at its size (rare; the first batch only)."""
    from sdprep.images import load_image

    return preprocess(load_image(p.item.path, "RGB", background=(255, 255, 255), root=p.item.root), size)


def run_tag(
    root: Path | str,
    opts: TagOptions | None = None,
    *,
    report: Reporter | None = None,
    tagger: WD14Tagger | None = None,
    captioner: Captioner | None = None,
    chain: Sequence[str] = (),
    executor: Executor | None = None,
) -> StageResult:
    """Tag (and optionally caption) every image under `root`; see the module docstring.

    `tagger` / `captioner` inject ready objects (tests, embedding); by default they are built from
    `opts.model` / `opts.captioner` on first need, so a run that needs no model never loads one.
    `chain`: the caption-writing stages of the chain this run is part of, in order (`sdprep run`;
    see prep/lineage.py). `executor`: where the models run (sdprep/executors.py): here by default,
    or batches of --batch-size images on a Ray cluster's workers (each loads the models once);
    sidecars and captions are written here either way.
    """
    root = Path(root).absolute()
    opts = opts or TagOptions()
    report = report or NullReporter()
    clashes = StageResult("tag")  # images sharing a stem would share one caption file: not tagged

    def clash(path: Path, reason: str) -> None:
        if in_shard(Item(path), root, opts.shard):
            clashes.fail(path, reason)

    _, found = dataset_items(root, opts.recursive, clash)
    items = [it for it in found if in_shard(it, root, opts.shard)]
    if not items:
        if not clashes.failed and opts.shard is not None:
            clashes.notes.append(f"no images of {root} fall in shard {opts.shard[0]}/{opts.shard[1]}")
        return clashes
    result = _Tagging(root, opts, report, tagger, captioner, chain, executor).run(items)
    result.failed[:0] = clashes.failed
    return result
