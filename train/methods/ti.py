"""Textual inversion for SDXL: new token vectors in BOTH text encoders, everything else frozen.

kohya's scheme: `token_string` becomes `num_vectors_per_token` tokens `tok, tok1, ..., tok{n-1}`
added to both tokenizers; their embedding rows start from `init_word`'s embedding (a multi-token
init word fills the vectors in turn) and are the only weights that train. Captions (or kohya's
object/style templates) name the base token and are expanded to all n tokens; sample prompts too.

Only the new rows can change: they live in a separate `[n, hidden]` parameter that the embedding
layer swaps in for the new token ids, so the optimizer never sees another row (weight decay is set
to 0 on it anyway). A checksum of every other weight is taken at the start and compared at each
save. The file is `{"clip_l": [n, 768], "clip_g": [n, 1280]}` as A1111/ComfyUI/diffusers load it;
after saving it is reloaded and must hold both tensors, finite, of the right shapes and moved away
from their initial values, or the run fails (an empty or untrained embedding is never reported).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdprep.errors import ConfigError, ModelError, TrainingError
from sdprep.train.methods.base import TrainMethod, allreduce_gradients
from sdprep.train.save.checkpoint import Fingerprint, fingerprint

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sdprep.train.config.schema import TrainConfig
    from sdprep.train.data.pipeline import TrainDataset
    from sdprep.train.models.load import SDXLModel

KEYS = ("clip_l", "clip_g")  # file keys for text encoder 1 (CLIP-L) and 2 (OpenCLIP bigG)


def token_names(token: str, n: int) -> list[str]:
    """kohya's token strings: `tok`, `tok1`, ..., `tok{n-1}`."""
    return [token] + [f"{token}{i}" for i in range(1, n)]


def token_pattern(token: str) -> re.Pattern[str]:
    """The token as a whole word (case-insensitive, as the CLIP tokenizer lower-cases)."""
    return re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])", re.IGNORECASE)


class TokenVectors(torch.nn.Module):
    """An embedding layer whose rows `first_id ... first_id+n-1` come from a trainable `[n, dim]`
    parameter; every other row comes from the frozen original layer."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, vectors: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first_id = int(first_id)
        self.vectors = torch.nn.Parameter(vectors.detach().clone().to(torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        n = self.vectors.shape[0]
        idx = input_ids - self.first_id
        new = (idx >= 0) & (idx < n)
        picked = self.vectors[idx.clamp(0, n - 1)].to(out.dtype)
        return torch.where(new.unsqueeze(-1), picked, out)


def _add_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str], which: str) -> list[int]:
    """Append the tokens to the tokenizer; their ids must follow its vocabulary."""
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab or t.lower() in vocab]
    if taken:
        raise ConfigError(
            f'token_string "{tokens[0]}": {which} already has {len(taken)} of the tokens ({", ".join(taken)})',
            "choose a token_string that is not already a special or added token",
        )
    first = len(tokenizer)
    tokenizer.add_tokens(tokens)
    converted = tokenizer.convert_tokens_to_ids(tokens)  # a list for a list
    ids = [converted] if isinstance(converted, int) else converted
    if list(ids) != list(range(first, first + len(tokens))):
        raise ModelError(f"{which}: the new token ids {ids} do not follow the vocabulary ({first} tokens)")
    for token, tid in zip(tokens, ids):
        if tokenizer(token, add_special_tokens=False).input_ids != [tid]:
            raise ConfigError(
                f'token_string "{tokens[0]}": {which} does not read "{token}" as one token',
                "use a token_string of plain letters and digits, without spaces",
            )
    return list(ids)


def _init_vectors(
    tokenizer: PreTrainedTokenizerBase, weight: torch.Tensor, init_word: str | None, n: int, which: str
) -> torch.Tensor:
    """The starting vectors: init_word's token embeddings in turn, or the mean embedding when unset."""
    if init_word is None:
        return weight.float().mean(dim=0, keepdim=True).repeat(n, 1)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(
            f'init_word "{init_word}" is empty for {which}: it tokenises to nothing',
            'use a word describing the concept, e.g. init_word = "woman"',
        )
    return torch.stack([weight[ids[i % len(ids)]].float() for i in range(n)])


def _embedding(encoder: PreTrainedModel, which: str) -> torch.nn.Embedding:
    """The text encoder's token embedding layer (a CLIP text model's is an `nn.Embedding`)."""
    layer = encoder.get_input_embeddings()
    if not isinstance(layer, torch.nn.Embedding):
        raise ModelError(
            f"{which}: the text encoder's input embeddings are a {type(layer).__name__}, not an Embedding"
        )
    return layer


class TextualInversionMethod(TrainMethod):
    name = "ti"
    architecture = "stable-diffusion-xl-v1-base/textual-inversion"
    title = "textual inversion"

    def __init__(self, cfg: TrainConfig) -> None:
        from sdprep.train.methods.templates import templates_for

        super().__init__(cfg)
        if not cfg.token_string or not cfg.token_string.strip():
            raise ConfigError("textual inversion needs token_string", 'e.g. token_string = "mytoken"')
        self.token = cfg.token_string.strip()
        if re.search(r"\s", self.token):
            raise ConfigError(f'token_string "{self.token}" contains a space', "use one word, e.g. mytoken")
        self.n = int(cfg.num_vectors_per_token)
        self.tokens = token_names(self.token, self.n)
        self.templates = templates_for(cfg.use_object_template, cfg.use_style_template)
        if cfg.use_object_template and cfg.use_style_template:
            self.notes.append(
                "use_object_template and use_style_template are both set: object templates used"
            )
        self.pattern = token_pattern(self.token)
        self.layers: list[TokenVectors] = []
        self.initial: dict[str, torch.Tensor] = {}
        self._frozen: Fingerprint = {}

    # -- setup -----------------------------------------------------------------------------

    def setup(self, model: SDXLModel, weight_dtype: torch.dtype) -> None:
        self.model = model
        model.freeze(weight_dtype)
        init_word = self.cfg.init_word.strip() if self.cfg.init_word is not None else None
        if init_word is None:
            self.notes.append("init_word is not set: the token starts from the mean of all embeddings")
        for which, tokenizer, encoder in (
            ("tokenizer", model.tokenizer, model.text_encoder),
            ("tokenizer_2", model.tokenizer_2, model.text_encoder_2),
        ):
            if init_word is not None:
                n_init = len(tokenizer(init_word, add_special_tokens=False).input_ids)
                if n_init > 1 and n_init != self.n and which == "tokenizer":
                    self.notes.append(
                        f'init_word "{init_word}" is {n_init} tokens but num_vectors_per_token is {self.n}: '
                        "its token embeddings are used in turn (as kohya)"
                    )
            ids = _add_tokens(tokenizer, self.tokens, which)
            base = _embedding(encoder, which)
            vectors = _init_vectors(tokenizer, base.weight.detach(), init_word, self.n, which)
            if ids[-1] >= base.num_embeddings:
                encoder.resize_token_embeddings(ids[-1] + 1, mean_resizing=False)
                base = _embedding(encoder, which)
            with torch.no_grad():
                base.weight[ids[0] : ids[-1] + 1] = vectors.to(base.weight.dtype)
            layer = TokenVectors(base, ids[0], vectors)
            encoder.set_input_embeddings(layer)
            self.layers.append(layer)
        self._remember_initial()
        allreduce_gradients([layer.vectors for layer in self.layers])
        self._frozen = self._fingerprint()

    def _remember_initial(self) -> None:
        self.initial = {key: layer.vectors.detach().clone().cpu() for key, layer in zip(KEYS, self.layers)}

    def _fingerprint(self) -> Fingerprint:
        m = self.model
        modules = {"unet": m.unet, "vae": m.vae, "te1": m.text_encoder, "te2": m.text_encoder_2}
        return fingerprint(modules, {id(layer.vectors) for layer in self.layers})

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.cfg.learning_rate
        # weight decay 0: nothing but the token's own vectors is in the group, and they should not shrink
        return [
            {"params": [layer.vectors for layer in self.layers], "lr": lr, "weight_decay": 0.0, "name": "ti"}
        ]

    @property
    def trains_text_encoders(self) -> bool:
        return True

    @property
    def trains_unet(self) -> bool:
        return False

    def train_modules(self) -> list[Any]:
        return [self.model.text_encoder, self.model.text_encoder_2]

    # -- captions and prompts --------------------------------------------------------------

    def expand(self, text: str) -> str:
        """The base token replaced by all n token strings (`tok` -> `tok tok1 tok2`)."""
        if self.n == 1:
            return text
        return self.pattern.sub(" ".join(self.tokens), text)

    def caption_transform(self) -> Callable[[str, np.random.Generator], str]:
        templates, token = self.templates, self.token

        def transform(caption: str, rng: np.random.Generator) -> str:
            if templates is not None:
                caption = templates[int(rng.integers(len(templates)))].format(token)
            return self.expand(caption)

        return transform

    def expand_prompt(self, prompt: str) -> str:
        return self.expand(prompt)

    def check_dataset(self, dataset: TrainDataset) -> None:
        """Fail before training when no caption names the token (it would never train)."""
        if self.templates is not None:
            return
        records = [r for r in dataset.records if not r.is_reg]
        with_token = 0
        for r in records:
            opts = dataset.subsets[r.subset].captions
            text = " ".join(x for x in (opts.caption_prefix, r.caption, opts.caption_suffix) if x)
            with_token += bool(self.pattern.search(text))
        if records and with_token == 0:
            raise ConfigError(
                f'none of the {len(records)} training captions contains token_string "{self.token}": '
                "the embedding would never be trained",
                f'put "{self.token}" in the captions (or caption_prefix = "{self.token},"), or set '
                "use_object_template / use_style_template = true",
            )
        if with_token < len(records):
            self.notes.append(
                f'{len(records) - with_token} of {len(records)} captions do not contain "{self.token}" '
                "(they train nothing but still cost steps)"
            )

    # -- state for resume ------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Any]:
        return {key: layer.vectors.detach().clone() for key, layer in zip(KEYS, self.layers)}

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        self._set_vectors(state, "the saved training state", check_dims=True)

    def _set_vectors(self, tensors: dict[str, Any], what: str, check_dims: bool = True) -> None:
        missing = [k for k in KEYS if k not in tensors]
        if missing:
            raise TrainingError(
                f"{what} has no {' / '.join(missing)} tensor (keys: {', '.join(sorted(tensors)) or 'none'})",
                "an SDXL embedding file holds clip_l and clip_g",
            )
        with torch.no_grad():
            for key, layer in zip(KEYS, self.layers):
                t = tensors[key]
                if tuple(t.shape) != tuple(layer.vectors.shape):
                    raise ConfigError(
                        f"{what}: {key} has shape {tuple(t.shape)}, this run trains {tuple(layer.vectors.shape)}",
                        f"set num_vectors_per_token = {t.shape[0]} to continue from it"
                        if t.dim() == 2 and t.shape[1] == layer.vectors.shape[1]
                        else "the file is for a different model (SDXL: 768 / 1280 wide)",
                    )
                layer.vectors.copy_(t.to(layer.vectors.dtype))

    # -- outputs ---------------------------------------------------------------------------

    def export_tensors(self, dtype: torch.dtype) -> dict[str, Any]:
        return {
            key: layer.vectors.detach().to(dtype).contiguous().cpu() for key, layer in zip(KEYS, self.layers)
        }

    def verify_tensors(self, tensors: dict[str, Any], trained: bool) -> list[str]:
        if not tensors:
            return ["the file has no tensors (an empty embedding)"]
        problems = []
        extra = sorted(set(tensors) - set(KEYS))
        if extra:
            problems.append(f"unexpected tensors {', '.join(extra)}")
        for key, layer in zip(KEYS, self.layers):
            t = tensors.get(key)
            if t is None:
                problems.append(f"{key} is missing")
                continue
            if tuple(t.shape) != tuple(layer.vectors.shape):
                problems.append(f"{key} has shape {tuple(t.shape)}, expected {tuple(layer.vectors.shape)}")
                continue
            if not torch.isfinite(t.float()).all():
                problems.append(f"{key} has NaN or infinite values")
                continue
            if not torch.equal(t, layer.vectors.detach().to(t.dtype).cpu()):
                problems.append(f"{key} in the file differs from the trained vectors")
            if trained:
                # in full precision: early in a warmup a bf16 file may still round to the start values
                init = self.initial[key]
                now = layer.vectors.detach().float().cpu()
                same = [i for i in range(now.shape[0]) if torch.equal(now[i], init[i])]
                if same:
                    which = "every vector" if len(same) == now.shape[0] else f"vector(s) {same}"
                    problems.append(
                        f"{key}: {which} still equal their initial value: the embedding has not trained"
                    )
        if self._frozen and self._fingerprint() != self._frozen:
            problems.append("weights outside the new token rows changed during training")
        return problems

    def metadata(self) -> dict[str, str]:
        return {
            "ss_token_string": self.token,
            "ss_num_vectors_per_token": str(self.n),
            "ss_init_word": str(self.cfg.init_word),
            "ss_use_template": "object"
            if self.cfg.use_object_template
            else ("style" if self.cfg.use_style_template else "False"),
        }

    def load_initial_weights(self) -> None:
        path = self.cfg.weights
        if not path:
            return
        self._set_vectors(read_embedding(Path(path)), f"weights {Path(path).name}")
        self._remember_initial()
        self.notes.append(f"weights: started from the embedding {Path(path).name}")


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """An SDXL embedding file's tensors, with clear errors for other kinds of files."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"weights {path}: no such file", "pass an SDXL embedding (.safetensors)")
    try:
        sd = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"weights {path}: not a readable safetensors file ({exc})") from exc
    if not sd:
        raise ModelError(f"weights {path}: the file is empty (no tensors)", "it cannot be continued from")
    if "emb_params" in sd or "string_to_param" in sd:
        raise ModelError(
            f"weights {path}: an SD 1.x/2.x embedding (one text encoder)", "SDXL needs clip_l and clip_g"
        )
    return sd
