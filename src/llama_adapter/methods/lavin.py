"""LaVIN: Mixture-of-Modality Adaptation (METHODS.md section 3).

- An `MMAdapter` before the attention of every language-model layer (optionally before the FFN
  too): a shared down-projection, two zero-initialised grouped up-projections mixed by a
  router, so the model starts exactly as the frozen base.
- Sequence layout, built by one function for training and generation alike:
  ``[modality token] [BOS the tokenizer adds itself, if any] "Image:" [visual tokens | "N/A"] [the example]``.
  The modality token (embedding 0: text only, 1: with image) has attention-mask 0, so no other
  token attends to it and its state depends on the modality only; every layer's router reads
  its state (the adapter's own normalised input) there. Positions are cumsum(mask) - 1, so the
  modality token and the first real token share position 0, in training, a full forward pass
  and cached decoding alike: no shift (METHODS.md 5).
- Routing cache: at prefill the routing weights [B, 2] of each adapter go into
  ``cache.state[(layer, "attn"|"ffn")]``; decode steps (the modality token is not in their
  input) read them from there.
- Visual side: the encoder's tapped globals -> `LavinNeck` -> one token per tap. On a ViT
  (CLIP/SigLIP), `vision_adapters` puts an MMAdapter before the attention of every block,
  routed per example from that example's own [CLS] state (the mean token for SigLIP, which
  has none). The default EfficientNet-Lite0 has no attention blocks, so it gets no encoder
  adapters (the option is then a no-op, not an error) and its frozen features can be cached.
- Training batches are cut after their last labelled token: what follows cannot change the loss.
- The prefix texts ("Image:", "N/A") are encoded with the tokenizer given at attach time
  (`la.attach(model, cfg, tokenizer=tok)`), never guessed from where the model came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import IGNORE, PreparedBatch
from ..model.llama import ForwardContext, KVCache, LlamaLM
from ..model.tokenizer import Tokenizer
from ..vision import LavinNeck
from .registry import Attached, Method, register
from .visual import VisualFrontend

MODALITY_INDEX = "lavin_modality_index"  # extras: [B] column of each row's modality token
TEXT, IMAGE = 0, 1  # modality embedding rows


@dataclass
class LavinConfig:
    """LaVIN: routed MM-adapters in every layer, the modality token, the visual neck (`vision: null`: text only).
    Ablations (off by default): `routing`, `modality_token` (docs/ablations.md)."""

    rank: int = 8
    temperature: float = 10.0  # routing softmax temperature (10 for 7B, 5 for 13B)
    scale: float = 1.0
    dropout: float = 0.1
    groups: int = 2  # groups of each up-projection
    ffn_adapter: bool = False  # also an adapter before every feed-forward network
    vision: str | None = "efficientnet-lite0"  # an encoder spec (see vision.load_encoder); None: text-only LaVIN
    vision_adapters: bool = True  # MM-adapters in every ViT block (none exist in a CNN)
    neck_hidden: int = 128
    image_prefix: str = "Image:"
    no_image_text: str = "N/A"
    feature_cache: bool = True  # cache frozen encoder features (only without trainable encoder adapters)
    # Ablations (docs/ablations.md); the defaults are the method. routing False: no router, every adapter
    # (language model and image encoder) takes the fixed path w = (1, 0), i.e. up-projection 0 alone.
    # modality_token False: no modality token in the sequence; the router then has nothing to read, so
    # it needs routing False too (refused otherwise).
    routing: bool = True
    modality_token: bool = True

    def __post_init__(self) -> None:
        for name in ("routing", "modality_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (on/off), got {getattr(self, name)!r}")
        if self.routing and not self.modality_token:
            raise ValueError("modality_token off leaves the router nothing to read (it routes on the modality "
                             "token's state): set routing off too (routing: off, modality_token: off)")
        if self.rank < 1 or self.groups < 1 or self.rank % self.groups:
            raise ValueError(f"rank must be a positive multiple of groups, got rank={self.rank}, groups={self.groups}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.neck_hidden < 1:
            raise ValueError(f"neck_hidden must be >= 1, got {self.neck_hidden}")
        if self.vision is not None and not str(self.vision).strip():
            raise ValueError("vision must be an encoder spec or null (text-only LaVIN)")


class GroupedUp(nn.Module):
    """r -> C in `groups` blocks (output block g reads only hidden block g), like Conv1d(groups=g, k=1).

    weight [groups, C/groups, r/groups] (C*r/groups values) and bias [C], both zero at init.
    """

    def __init__(self, rank: int, dim: int, groups: int):
        super().__init__()
        if dim % groups or rank % groups:
            raise ValueError(f"width {dim} and rank {rank} must both be divisible by groups={groups}")
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(groups, dim // groups, rank // groups))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.unflatten(-1, (self.groups, -1))
        return torch.einsum("...gk,gok->...go", xg, self.weight.to(x.dtype)).flatten(-2) + self.bias.to(x.dtype)


class MMAdapter(nn.Module):
    """A(z) = z + s * [w0 U0(drop(D z)) + w1 U1(drop(D z))], (w0, w1) = softmax(router(t) / tau).

    Called with z alone (inside a ViT), t is each example's own token 0 ([CLS]), or the mean token
    with `route_from="mean"`. Parameters are fp32; inputs of another dtype are cast in and out.
    """

    def __init__(self, dim: int, rank: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1,
                 temperature: float = 10.0, route_from: str = "cls", routed: bool = True):
        super().__init__()
        self.routed = routed  # False (ablation): the fixed path w = (1, 0), the router unused
        if route_from not in ("cls", "mean"):
            raise ValueError(f"route_from must be 'cls' or 'mean', got {route_from!r}")
        self.scale, self.p, self.temperature, self.route_from = scale, dropout, temperature, route_from
        self.down = nn.Linear(dim, rank)
        self.up0 = GroupedUp(rank, dim, groups)
        self.up1 = GroupedUp(rank, dim, groups)
        self.router = nn.Linear(dim, 2)

    def fixed_weights(self, batch: int, device: torch.device) -> torch.Tensor:
        """The routing weights [B, 2] without a router (ablation): up-projection 0 with weight 1."""
        return torch.tensor([1.0, 0.0], device=device).expand(batch, 2)

    def routing(self, t: torch.Tensor) -> torch.Tensor:
        """Routing weights [B, 2] (fp32) from routing-token states t [B, C]."""
        if not self.routed:
            return self.fixed_weights(t.shape[0], t.device)
        logits = self.router(t.to(self.router.weight.dtype)).float()
        return torch.softmax(logits / self.temperature, dim=-1)

    def mix(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Dropout only in training steps: generation runs under inference mode but never calls .eval().
        train = self.training and torch.is_grad_enabled()
        hidden = F.dropout(self.down(z.to(self.down.weight.dtype)), self.p, train)
        w = weights.to(hidden.dtype).view(weights.shape[0], *([1] * (z.dim() - 2)), 2)
        delta = w[..., 0:1] * self.up0(hidden) + w[..., 1:2] * self.up1(hidden)
        return z + (self.scale * delta).to(z.dtype)

    def forward(self, z: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            weights = self.routing(z[:, 0] if self.route_from == "cls" else z.mean(dim=1))
        return self.mix(z, weights)


class ModalityRoutedAdapter(MMAdapter):
    """The language model's MM-adapter: routed by the modality token's state at prefill, cached for decoding."""

    def __init__(self, layer: int, slot: str, dim: int, **kw: Any):
        super().__init__(dim, **kw)
        self.key = (layer, slot)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # type: ignore[override]
        weights = self.weights(h, ctx)
        cache = ctx.cache
        if cache is None or cache.length == 0 or torch.is_grad_enabled():
            return self.mix(h, weights)
        # A decode step: the routing weights are fixed, so w0 U0 + w1 U1 is one up-projection per row, mixed once
        # per generation (half the up-projection work and a third of the small operators of `mix`).
        up_w, up_b = self.mixed_up(cache, weights)
        hidden = self.down(h.to(self.down.weight.dtype))
        hg = hidden.unflatten(-1, (up_w.shape[1], -1))
        up = torch.einsum("b...gk,bgok->b...go", hg, up_w.to(hidden.dtype)).flatten(-2)
        up = up + up_b.to(hidden.dtype).view(up_b.shape[0], *([1] * (h.dim() - 2)), -1)
        return h + (self.scale * up).to(h.dtype)

    def mixed_up(self, cache: KVCache, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w0 U0 + w1 U1 per row ([B, groups, C/groups, r/groups]) and w0 b0 + w1 b1 ([B, C]) for routing
        weights [B, 2], kept in the cache's per-generation state."""
        key_w, key_b = (*self.key, "mixed_w"), (*self.key, "mixed_b")
        if key_w not in cache.state:
            w = weights.to(self.up0.weight.dtype)
            w0, w1 = w[:, 0, None, None, None], w[:, 1, None, None, None]
            cache.state[key_w] = w0 * self.up0.weight + w1 * self.up1.weight
            cache.state[key_b] = w[:, 0:1] * self.up0.bias + w[:, 1:2] * self.up1.bias
        return cache.state[key_w], cache.state[key_b]

    def decode_terms(self, cache: KVCache, rows: int, extras: dict[str, Any] | None = None) -> dict[str, Any]:
        """For the compiled decode step (model/fastpath.py), after the prefill: the adapter's tensors, with the
        up-projections mixed by the routing weights the prefill fixed (`up_w` and `up_b` per row, dim 0 = batch:
        fastpath.ADAPTER_ROW_RANKS). `extras`, the method inputs, are not needed here."""
        if self.routed and self.key not in cache.state:
            raise ValueError("LaVIN decode step without routing weights in the cache: decode after a prefill")
        weights = cache.state[self.key] if self.routed else self.fixed_weights(rows, self.down.weight.device)
        up_w, up_b = self.mixed_up(cache, weights)
        return {"down_w": self.down.weight, "down_b": self.down.bias, "up_w": up_w, "up_b": up_b,
                "scale": float(self.scale)}

    def weights(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if not self.routed:
            return self.fixed_weights(h.shape[0], h.device)
        cache = ctx.cache
        if cache is not None and cache.length > 0:  # a decode step: the modality token was in the prefill
            if self.key not in cache.state:
                raise ValueError("LaVIN decode step without routing weights in the cache: the prefill must go "
                                 "through the method's prepare_inputs")
            return cache.state[self.key]
        index = ctx.extras.get(MODALITY_INDEX)
        if index is None:
            raise ValueError("LaVIN needs its modality token: feed inputs built by model.adapter.prepare_inputs "
                             "or prepare_batch (la.generate and the Trainer do)")
        weights = self.routing(h[torch.arange(h.shape[0], device=h.device), index.to(h.device)])
        if cache is not None:
            cache.state[self.key] = weights
        return weights


class LavinInputs(nn.Module):
    """The modality embeddings, the visual frontend and neck, and the one sequence builder they feed."""

    def __init__(self, cfg: LavinConfig, dim: int, tokenizer: Tokenizer | None):
        super().__init__()
        self.cfg = cfg
        self.modality = nn.Embedding(2, dim)
        nn.init.normal_(self.modality.weight, std=0.02)
        self.frontend: VisualFrontend | None = None
        self.neck: LavinNeck | None = None
        if cfg.vision:
            self.frontend = VisualFrontend(cfg.vision, cfg.feature_cache)
            self.neck = LavinNeck(self.frontend.encoder.global_dims, dim, cfg.neck_hidden)
        self._tok = tokenizer  # given at attach time (None only on the meta device, where nothing runs)
        self._texts: tuple[int | None, list[int], list[int]] | None = None

    def set_tokenizer(self, tok: Tokenizer) -> None:
        self._tok, self._texts = tok, None

    def texts(self) -> tuple[int | None, list[int], list[int]]:
        """(BOS the tokenizer adds on its own or None, ids of image_prefix, ids of no_image_text)."""
        if self._texts is None:
            tok = self._tok
            if tok is None:
                raise ValueError("LaVIN embeds its prefix texts with the model's tokenizer: attach it with "
                                 "la.attach(model, config, tokenizer=tok)")
            lead = tok.encode("", add_special_tokens=True)
            self._texts = (lead[0] if len(lead) == 1 else None,
                           tok.encode(self.cfg.image_prefix, add_special_tokens=False),
                           tok.encode(self.cfg.no_image_text, add_special_tokens=False))
        return self._texts

    def visual(self, model: LlamaLM, images: Sequence[Any] | None,
               batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(visual tokens [B, n_taps, C] or None, has_image bool [B])."""
        if images is None or all(im is None for im in images):
            if self.frontend is not None:
                self.frontend.standardizer.observe_no_images()  # keeps the ranks' statistics in step
            return None, torch.zeros(batch_size, dtype=torch.bool, device=model.device)
        if self.frontend is None or self.neck is None:
            raise ValueError("images were given, but this LaVIN adapter was attached without vision (vision: null)")
        feats, has = self.frontend.features(images, batch_size, model.device)
        assert feats is not None
        return self.neck(feats), has

    def build(self, model: LlamaLM, ids: torch.Tensor, real: torch.Tensor, labels: torch.Tensor | None,
              images: Sequence[Any] | None, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor]:
        """The one sequence layout: (inputs_embeds, attention_mask, labels or None, modality index [B]).

        `real` [B, T] marks each row's tokens; rows are padded on the left (generation) or right (training).
        """
        B, device = ids.shape[0], model.device
        bos, prefix, no_image = self.texts()
        vis, has = self.visual(model, images, B)
        emb = model.embed_tokens
        dtype = emb.weight.dtype
        tokens = emb(ids)
        prefix_e = emb(torch.tensor(prefix, dtype=torch.long, device=device))
        no_image_e = emb(torch.tensor(no_image, dtype=torch.long, device=device))
        modality = self.modality(has.long()).to(dtype)
        lead = 1 if self.cfg.modality_token else 0  # the modality token (ablation: none)
        seqs, labs = [], []
        for b in range(B):
            keep = real[b].nonzero().squeeze(-1)
            head = 1 if bos is not None and len(keep) and int(ids[b, keep[0]]) == bos else 0
            middle = vis[b].to(dtype) if vis is not None and bool(has[b]) else no_image_e
            row = tokens[b, keep]
            seqs.append(torch.cat([modality[b:b + lead], row[:head], prefix_e, middle, row[head:]]))
            if labels is not None:
                lab = labels[b, keep]
                ignore = lab.new_full((len(prefix) + middle.shape[0],), IGNORE)
                labs.append(torch.cat([lab.new_full((lead,), IGNORE), lab[:head], ignore, lab[head:]]))
        width = max(s.shape[0] for s in seqs)
        pads = [width - s.shape[0] for s in seqs]
        embeds = torch.stack([F.pad(s, (0, 0, p, 0) if left else (0, 0, 0, p)) for s, p in zip(seqs, pads)])
        index = torch.tensor(pads if left else [0] * B, dtype=torch.long, device=device)
        cols = torch.arange(width, device=device)[None, :]
        lengths = torch.tensor([s.shape[0] for s in seqs], device=device)[:, None]
        mask = ((cols >= index[:, None] + lead) & (cols < index[:, None] + lengths)).long()
        out_labels = None
        if labels is not None:
            out_labels = torch.stack([F.pad(lab, (p, 0) if left else (0, p), value=IGNORE)
                                      for lab, p in zip(labs, pads)])
        return embeds, mask, out_labels, index

    def prepare_inputs(self, model: LlamaLM, ids: torch.Tensor, mask: torch.Tensor | None,
                       images: Sequence[Any] | None) -> PreparedBatch:
        """Generation: left-padded prompts -> left-padded LaVIN sequences."""
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        embeds, new_mask, _, index = self.build(model, ids, real, None, images, left=True)
        return PreparedBatch(None, embeds, new_mask, {MODALITY_INDEX: index})

    def prepare_batch(self, model: LlamaLM, batch: Any) -> tuple[dict[str, Any], torch.Tensor]:
        """Training: right-padded batch -> right-padded sequences, cut after each row's last label."""
        labelled = batch.labels != IGNORE
        T = labelled.shape[1]
        last = torch.where(labelled.any(1), T - labelled.flip(1).long().argmax(1), 0)
        real = torch.arange(T, device=labelled.device)[None, :] < last[:, None]
        embeds, mask, labels, index = self.build(model, batch.input_ids, real, batch.labels,
                                                 getattr(batch, "images", None), left=False)
        assert labels is not None
        return {"inputs_embeds": embeds, "attention_mask": mask, "extras": {MODALITY_INDEX: index}}, labels


def set_tokenizer(model: LlamaLM, tok: Tokenizer) -> None:
    """Replace the tokenizer LaVIN was attached with (it encodes the prefix texts with it)."""
    if model.adapter is None or model.adapter.method != "lavin":
        raise ValueError("no LaVIN adapter is attached to this model")
    inputs = model.lavin
    assert isinstance(inputs, LavinInputs)
    inputs.set_tokenizer(tok)


def _vit_blocks(frontend: VisualFrontend) -> int:
    try:
        return len(frontend.encoder.blocks)
    except ValueError:  # a CNN (EfficientNet): no attention blocks, so no encoder adapters
        return 0


def attach(model: LlamaLM, cfg: LavinConfig, tokenizer: Tokenizer | None) -> Attached:
    c = model.config
    kw: dict[str, Any] = dict(rank=cfg.rank, groups=cfg.groups, scale=cfg.scale, dropout=cfg.dropout,
                              temperature=cfg.temperature, routed=cfg.routing)
    names: list[str] = []
    for i, layer in enumerate(model.layers):
        layer.attn_adapter = ModalityRoutedAdapter(i, "attn", c.dim, **kw).to(model.device)
        names += [f"layers.{i}.attn_adapter.{n}" for n, _ in layer.attn_adapter.named_parameters()]
        if cfg.ffn_adapter:
            layer.ffn_adapter = ModalityRoutedAdapter(i, "ffn", c.dim, **kw).to(model.device)
            names += [f"layers.{i}.ffn_adapter.{n}" for n, _ in layer.ffn_adapter.named_parameters()]
    inputs = LavinInputs(cfg, c.dim, tokenizer)
    if inputs.frontend is not None and cfg.vision_adapters:
        encoder = inputs.frontend.encoder
        route = "cls" if getattr(encoder, "has_cls", True) else "mean"
        for j in range(_vit_blocks(inputs.frontend)):
            encoder.set_pre_attention_adapter(j, MMAdapter(encoder.token_dim, route_from=route, **kw))
    model.lavin = inputs.to(model.device)
    names += [f"lavin.{n}" for n, _ in inputs.named_parameters()
              if n.startswith(("modality.", "neck.")) or ".pre_attention_adapter." in n]
    unused = ((() if cfg.routing else (".router.", ".up1.")) +  # ablations: parts that never act are not trained
              (() if cfg.modality_token else ("lavin.modality.",)))
    names = [n for n in names if not any(u in n or n.startswith(u) for u in unused)]
    buffers = inputs.frontend.state_buffer_names("lavin.frontend.") if inputs.frontend is not None else []
    return Attached("lavin", cfg, groups={"lavin": names}, buffers=buffers, prepare_inputs=inputs.prepare_inputs,
                    prepare_batch=inputs.prepare_batch, images=inputs.frontend is not None)


METHOD = register(Method("lavin", LavinConfig, attach, needs_tokenizer=True))
