"""The Uni-Perceiver network: one shared encoder for images, video and text, scored by similarity."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.class_rows import classifier_rows
from uniperceiver_cli.model.config import EOT_ID, SPE_ID, ModelConfig
from uniperceiver_cli.model.decoding import beam_search
from uniperceiver_cli.model.embeddings import TextEmbedding, VisualEmbedding
from uniperceiver_cli.model.heads import SimilarityHead
from uniperceiver_cli.model.layers import KV, Block, checkpointed_block
from uniperceiver_cli.model.moe import GATES, ExpertLinear, FeatureGate, RouterLog, Routing, task_index
from uniperceiver_cli.model.tokenizer import cloze_ids, get_tokenizer, label_word_ids, pad_rows

VISUAL = Routing(("visual_input",))
TEXT_TARGET = Routing(("text_target",))
VOCABULARY = Routing(("vocabulary",))  # also the label words and VQA answers: word targets
COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile_blocks
RECOMPILE_LIMIT = 64  # graphs of the block code (torch's default, 8, is a task mix of attribute MoE's)


def two_stream_mask(prefix: int, words: int, queries: int, device: torch.device | None = None) -> torch.Tensor:
    """The captioning attention layout [prefix | words | queries]; True = may attend. (S, S)

    The prefix (<|spe|> + visual tokens) sees only itself; word j sees the prefix and words 0..j;
    query j sees the prefix, words 0..j-1 and itself, so it predicts word j without seeing it.
    """
    size = prefix + words + queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[:, :prefix] = True
    w, q = slice(prefix, prefix + words), slice(prefix + words, size)
    mask[w, w] = torch.ones(words, words, dtype=torch.bool, device=device).tril()
    mask[q, w] = torch.ones(queries, words, dtype=torch.bool, device=device).tril(-1)
    mask[q, q] = torch.eye(queries, dtype=torch.bool, device=device)
    return mask


@dataclasses.dataclass
class Targets:
    """What a model's weights were trained over (a bundle's ``config.json`` "targets"); None where not recorded."""

    class_names: list[str] | None = None  # the class of each classifier-prompt (fc_prompt) row
    caption_vocabulary: torch.Tensor | None = None  # the token ids caption training scored against

    def apply(self, model: UniPerceiver) -> None:
        """Set them on a model that holds these weights. Class names describe fc_prompt rows, so a model whose
        classifier has another size (a non-strict load left it out) gets none."""
        fits = self.class_names is not None and len(self.class_names) == model.config.prompt.classifier_classes
        model.class_names = list(self.class_names) if fits else None
        model.caption_vocabulary = self.caption_vocabulary


def host_memory() -> int | None:
    """This machine's physical memory in bytes, where the system says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(config: ModelConfig) -> None:
    """Refuse, before anything is allocated, a model whose fp32 weights and sin-cos table alone exceed this machine's
    memory (a config with a typo'd width or layer count). Building on the meta device allocates nothing and is not
    checked."""
    if torch.get_default_device().type == "meta":
        return
    need, have = 4 * (config.num_parameters() + config.grid_size**2 * config.width), host_memory()
    if have is not None and need > have:
        raise ValueError(f"the model ({config.num_parameters():,} parameters: width {config.width}, {config.layers} "
                         f"layers) needs {need / 2**30:.1f} GiB for its fp32 weights alone; this machine has "
                         f"{have / 2**30:.1f} GiB")


class UniPerceiver(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_memory(config)
        self.config = config
        self.text_embed = TextEmbedding(config)
        self.visual_embed = VisualEmbedding(config)
        self.embed_norm = nn.LayerNorm(config.width)  # shared by text and visual tokens
        moe = config.moe
        self.blocks = nn.ModuleList(
            Block(config, moe=moe is not None and moe.is_moe_layer(i)) for i in range(config.layers))
        self.head = SimilarityHead(config)
        self._vocabulary: tuple[str | None, torch.Tensor] | None = None  # the task it was encoded for, features
        self.task: str | None = None  # the task the calls route by (task routing), set by routing_task
        # What the weights were trained over, kept in a bundle's config.json (None: not recorded). The class
        # name of each classifier-prompt row, so labels find their row by name; and the token ids caption
        # training scored against, which decoding should use too.
        self.class_names: list[str] | None = None
        self.caption_vocabulary: torch.Tensor | None = None
        # Activation checkpointing (train.activation_checkpointing): where a backward pass can follow (training
        # mode, gradients on, no decoding cache) each block keeps only its inputs and runs again in the backward
        # pass, so the activations kept for the backward are one (B, S, D) tensor per block instead of all of
        # their intermediates, for about one more forward pass of compute. Gradients are unchanged.
        self.activation_checkpointing: bool = False
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self) -> None:
        """MAE-style init: xavier-uniform linears (a fused QKV counts as three), N(0, 0.02) tables."""
        qkv = {block.attn.qkv for block in self.blocks}
        for module in self.modules():
            if isinstance(module, (nn.Linear, ExpertLinear)):
                fan_out, fan_in = module.weight.shape[-2:]
                bound = math.sqrt(6 / (2 * fan_in if module in qkv else fan_in + fan_out))
                nn.init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        patch = self.visual_embed.patch
        nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
        nn.init.zeros_(patch.bias)
        nn.init.normal_(self.text_embed.text_type, std=0.02)
        for block in self.blocks:
            for prompt in (block.prompt, block.target_prompt):
                if prompt is not None:
                    nn.init.normal_(prompt, std=0.02)
        self.head.reset_parameters()

    # ------------------------------------------------------------------ parameter roles
    def _names(self, parts: Iterable[nn.Module | nn.Parameter | None]) -> set[str]:
        ids = {id(p) for part in parts if part is not None
               for p in (part.parameters() if isinstance(part, nn.Module) else (part,))}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    @property
    def device(self) -> torch.device:
        return self.head.proj.weight.device

    @property
    def targets(self) -> Targets:
        """What the weights were trained over, as one object: copied whole to a model of the same weights."""
        return Targets(self.class_names, self.caption_vocabulary)

    @targets.setter
    def targets(self, value: Targets) -> None:
        self.class_names, self.caption_vocabulary = value.class_names, value.caption_vocabulary

    def no_weight_decay(self) -> set[str]:
        """What AdamW does not decay (reference 5.3): all but the weights of the linears and the patch conv outside
        the MoE gates, so norms, biases, embedding tables, temperatures, layer scales, gates and prompts."""
        decayed = self._names(m.weight for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d, ExpertLinear)))
        gates = self._names(m for m in self.modules() if isinstance(m, GATES))
        return {name for name, _ in self.named_parameters()} - (decayed - gates)

    def prompt_parameters(self, encoder_norms: bool = True) -> set[str]:
        """What prompt tuning trains (reference 7.1): the encoder's LayerNorms (not the MoE gates' own, as in the
        reference), ln_post, the <|spe|> bias, the deep prompts and the classifier prompt. Without
        ``encoder_norms``: those an init checkpoint may lack (they start fresh)."""
        parts = [self.head.ln_post, self.text_embed.spe_bias, self.head.fc_prompt, self.head.similarity_weight,
                 *(p for block in self.blocks for p in (block.prompt, block.target_prompt))]
        if encoder_norms:
            parts += [self.embed_norm, *(n for block in self.blocks for n in (block.norm1, block.norm2))]
        return self._names(parts)

    def train(self, mode: bool = True) -> UniPerceiver:
        self._vocabulary = None  # cached target features are only valid while the weights do not change
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._vocabulary = None
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ routing
    @property
    def decodes_with_cache(self) -> bool:
        """Whether caption decoding may use the key/value cache: not with context routing, whose decision for a
        step's tokens needs the whole sample."""
        return self.config.moe is None or self.config.moe.routing != "context"

    @contextlib.contextmanager
    def routing_task(self, task: str | None) -> Iterator[None]:
        """Run the calls inside as task ``task``: what task routing routes by (the other levels ignore it).

        Raises:
            ValueError: the model routes by task and ``task`` is not one of its routed tasks (``moe.tasks``).
        """
        moe = self.config.moe
        if moe is not None and moe.routing == "task":
            task_index(moe.tasks, task)
        before, self.task = self.task, task
        try:
            yield
        finally:
            self.task = before

    @contextlib.contextmanager
    def router_log(self) -> Iterator[RouterLog]:
        """Collect what the token- and context-routed gates report (their losses, drops and loads) from the calls
        inside; the training loop reads ``log.stats()`` after each micro-batch's forward. Other levels record
        nothing."""
        log, gates = RouterLog(), [m for m in self.modules() if isinstance(m, FeatureGate)]
        for gate in gates:
            gate.log = log
        try:
            yield log
        finally:
            for gate in gates:
                gate.log = None

    # ------------------------------------------------------------------ embedding
    def spe(self, batch: int) -> torch.Tensor:
        """The <|spe|> prefix every sequence starts with: LN(word embedding), no position. (B, 1, D)"""
        return self.embed_norm(self.text_embed.spe()).expand(batch, 1, -1)

    def embed_text(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_norm(self.text_embed(ids, positions))

    def embed_visual(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> (B, T*N, D). In training the temporal ids start at a random offset
        (an image gets a random one of the temporal rows), at evaluation at 0."""
        offset = 0
        spare = self.config.max_frames - video.shape[1]
        if self.training and spare > 0:
            offset = int(torch.randint(0, spare + 1, ()))
        return self.embed_norm(self.visual_embed(video, offset))

    # ------------------------------------------------------------------ the encoder
    def encode(self, x: torch.Tensor, *, padding: torch.Tensor | None = None,
               structure: torch.Tensor | None = None, routing: Routing | None = None,
               side: str = "input", past: list[KV] | None = None,
               ) -> tuple[torch.Tensor, list[KV]]:
        """Run the shared encoder on embedded tokens.

        Args:
            x: (B, S, D) embedded tokens, <|spe|> included where the sequence has one.
            padding: (B, S) True at padded tokens (masked as keys only).
            structure: (S, K) True where token i may attend key j; K counts ``past`` keys plus the S tokens.
            routing: attribute rows for mixture-of-experts layers (ignored by dense layers); the model adds its
                ``task`` and ``padding``.
            side: "input" or "target": which deep prompts a prompt-tuned model prepends.
            past: per-layer keys/values of earlier tokens (caption decoding); deep prompts sit inside them.

        Returns:
            The last layer's output (B, S, D) and every layer's keys/values, prompts and past included; no
            keys/values (an empty list) where the blocks run checkpointed (:meth:`checkpoints`).
        """
        past_len = past[0][0].shape[2] if past is not None else 0
        allowed = None
        if padding is not None:
            allowed = ~padding[:, None, None, :]  # (B, 1, 1, S)
            if past_len:
                allowed = F.pad(allowed, (past_len, 0), value=True)
        if structure is not None:
            allowed = structure[None, None] if allowed is None else allowed & structure
        moe = self.config.moe
        if routing is not None and moe is not None:
            if past is not None and moe.routing == "context":
                raise ValueError("context routing cannot decode with the key/value cache: a step's tokens do not hold "
                                 "the sample's context; decode with use_cache=False")
            routing = dataclasses.replace(routing, task=routing.task or self.task, padding=padding)
        prompt_len = self.config.prompt.deep_prompt_length if past is None else 0
        if prompt_len and allowed is not None:
            allowed = F.pad(allowed, (prompt_len, 0), value=True)
        caches = []
        if self.checkpoints(past):
            for block in self.blocks:
                x = checkpointed_block(block, x, allowed, routing, side)
            return x, caches
        for i, block in enumerate(self.blocks):
            x, kv = block(x, allowed, routing, None if past is None else past[i], side)
            caches.append(kv)
        return x, caches

    def compile_blocks(self, backend: str | None = None) -> UniPerceiver:
        """``torch.compile`` each encoder block in place (torchtitan's per-block compile): the blocks share their
        code, so one graph per input shape serves every layer, and the parameters' names do not change. The
        first sequence length seen compiles static, the next ones one dynamic graph (torch's automatic dynamic
        shapes). Each kind of call (its mask: none, padding, the captioning layout; its routing rows; an expert or
        a dense block) is a graph of its own, so the recompile limit is raised to :data:`RECOMPILE_LIMIT` for a
        task mix. ``backend``: torch.compile's, default :data:`COMPILE_BACKEND`. Returns the model."""
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # before torch 2.7
        setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
        for block in self.blocks:
            block.compile(backend=backend or COMPILE_BACKEND)
        return self

    def checkpoints(self, past: list[KV] | None = None) -> bool:
        """Whether :meth:`encode` runs its blocks checkpointed: ``activation_checkpointing`` is on and a backward
        pass can follow (training mode, gradients enabled). Never with ``past``: decoding needs every layer's
        keys/values, which checkpointed blocks do not return."""
        return self.activation_checkpointing and self.training and torch.is_grad_enabled() and past is None

    def visual_prefix(self, video: torch.Tensor) -> torch.Tensor:
        """[<|spe|>, visual tokens] embedded. video (B, T, 3, H, W) -> (B, 1 + T*N, D)."""
        return torch.cat([self.spe(video.shape[0]), self.embed_visual(video)], dim=1)

    def encode_visual(self, video: torch.Tensor, routing: Routing = VISUAL) -> torch.Tensor:
        """[<|spe|>, visual tokens] through the encoder. video (B, T, 3, H, W) -> (B, 1 + T*N, D)."""
        return self.encode(self.visual_prefix(video), routing=routing)[0]

    def encode_two_stream(self, prefix: torch.Tensor, words: torch.Tensor, queries: int,
                          padding: torch.Tensor | None = None) -> torch.Tensor:
        """The captioning layout [prefix | words | queries] through the encoder: prefix (B, P, D) embedded, word
        ids (B, n), then ``queries`` <|spe|> queries at positions 0, 1, ...; padding (B, n) masks the words and,
        with ``queries`` = n, their queries. Returns the queries' outputs (B, queries, D)."""
        (b, n), p = words.shape, prefix.shape[1]
        spe = torch.full((b, queries), SPE_ID, device=words.device)
        x = torch.cat([prefix, self.embed_text(words), self.embed_text(spe)], dim=1)
        if padding is not None:
            padding = torch.cat([padding.new_zeros(b, p), padding, padding], dim=1)
        out, _ = self.encode(x, padding=padding, structure=two_stream_mask(p, n, queries, words.device),
                             routing=Routing(("caption_visual", "caption_text"), (p,)))
        return out[:, p + n:]

    def encode_text_tokens(self, ids: torch.Tensor, padding: torch.Tensor | None = None, *,
                           routing: Routing = TEXT_TARGET, side: str = "target") -> torch.Tensor:
        """[<|spe|>, ids] through the encoder. ids (B, L) -> (B, 1 + L, D)."""
        x = torch.cat([self.spe(ids.shape[0]), self.embed_text(ids)], dim=1)
        if padding is not None:
            padding = F.pad(padding, (1, 0), value=False)
        return self.encode(x, padding=padding, routing=routing, side=side)[0]

    def features(self, out: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, S, D) -> the normalised feature of its <|spe|> slot. (B, D)"""
        return self.head.project(out[:, 0])

    # ------------------------------------------------------------------ public feature API
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), preprocessed -> L2-normalised features (B, D)."""
        if images.dim() != 4:
            raise ValueError(f"encode_image expects (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.features(self.encode_visual(images[:, None]))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W), preprocessed -> L2-normalised features (B, D)."""
        if video.dim() != 5:
            raise ValueError(f"encode_video expects (B, T, 3, H, W), got shape {tuple(video.shape)}")
        return self.features(self.encode_visual(video))

    def encode_text(self, texts: Sequence[str] | torch.Tensor, padding: torch.Tensor | None = None, *,
                    routing: Routing = TEXT_TARGET, max_len: int | None = None,
                    chunk_size: int = 4096) -> torch.Tensor:
        """Texts (strings, or ids (B, L) with optional padding) -> L2-normalised features (B, D).

        Strings are tokenised with the CLIP BPE plus end-of-text. Encoded as candidates (targets), the
        way class names and retrieval captions are; large sets run in chunks of ``chunk_size``.
        """
        if not isinstance(texts, torch.Tensor):
            texts, padding = get_tokenizer().encode_batch(list(texts), max_len=max_len or self.config.max_text_len)
        texts = texts.to(self.device)
        padding = padding.to(self.device) if padding is not None else None
        feats = []
        for start in range(0, texts.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            out = self.encode_text_tokens(texts[part], None if padding is None else padding[part], routing=routing)
            feats.append(self.features(out))
        return torch.cat(feats)

    def vocabulary_features(self) -> torch.Tensor:
        """Features of the whole vocabulary, [v, <|endoftext|>] for every id v: index i is token i.

        Captioning and MLM score against this set. Cached while the model is in eval mode (per routed task).
        """
        moe = self.config.moe
        task = self.task if moe is not None and moe.routing == "task" else None  # what the features depend on
        if self._vocabulary is not None and self._vocabulary[0] == task and not self.training:
            return self._vocabulary[1]
        feats = self.vocabulary_targets(torch.arange(self.config.vocab_size))
        if not self.training:
            self._vocabulary = task, feats
        return feats

    def caption_targets(self, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A caption decoding target set: its features and the token id of each row.

        ``token_ids=None`` is the whole vocabulary (cached, row i = token i, ids None); otherwise those ids
        plus <|endoftext|>, sorted and unique, each encoded like a vocabulary row.
        """
        if token_ids is None:
            return self.vocabulary_features(), None
        ids = torch.cat([token_ids.cpu(), torch.tensor([EOT_ID])]).unique()
        return self.vocabulary_targets(ids), ids

    def vocabulary_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (V,) -> features (V, D) of the target rows [id, <|endoftext|>] captioning and MLM score."""
        return self.encode_text(torch.stack([ids, torch.full_like(ids, EOT_ID)], dim=1), routing=VOCABULARY)

    # ------------------------------------------------------------------ task logits
    def classifier_rows(self, names: Sequence[str]) -> torch.Tensor | None:
        """The classifier-prompt row of each class name, for ``classification_logits(..., rows=)``; None where rows
        go by position (see :func:`uniperceiver_cli.model.class_rows.classifier_rows`)."""
        rows = classifier_rows(self.class_names, self.config.prompt.classifier_classes, names)
        return None if rows is None else torch.tensor(rows, device=self.device)

    def classification_logits(self, inputs: torch.Tensor, targets: torch.Tensor,
                              rows: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) or video (B, T, 3, H, W) against target features (C, D) -> (B, C).

        A prompt-tuned classifier adds its logits: target c takes row ``rows[c]`` (see :meth:`classifier_rows`),
        by default row c."""
        video = inputs.dim() == 5
        query = self.encode_video(inputs) if video else self.encode_image(inputs)
        return self.head.logits(query, targets, "video_cls" if video else "img_cls", classifier=True, rows=rows)

    def retrieval_logits(self, inputs: torch.Tensor, text_ids: torch.Tensor,
                         text_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Visual inputs (B, ...) against texts (B', L) -> image-to-text logits (B, B'); transpose for t2i."""
        return self.head.logits(*self.retrieval_features(inputs, text_ids, text_padding), "retrieve")

    def retrieval_features(self, inputs: torch.Tensor, text_ids: torch.Tensor,
                           text_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual features (B, D) and the text features (B', D) that :meth:`retrieval_logits` scores."""
        query = self.encode_video(inputs) if inputs.dim() == 5 else self.encode_image(inputs)
        return query, self.encode_text(text_ids, text_padding)

    def caption_logits(self, inputs: torch.Tensor, ids: torch.Tensor, padding: torch.Tensor | None,
                       vocabulary: torch.Tensor) -> torch.Tensor:
        """Teacher-forced captioning in one pass with the two-stream layout.

        inputs (B, 3, H, W) or (B, T, 3, H, W); caption ids (B, n) ending in <|endoftext|>, no start token.
        Query j predicts ids[:, j]. Returns logits (B, n, V) against the vocabulary features.
        """
        video = inputs if inputs.dim() == 5 else inputs[:, None]
        visual = self.embed_visual(video)  # before <|spe|>: the shared norm's gradients add up in the same order
        prefix = torch.cat([self.spe(video.shape[0]), visual], dim=1)
        query = self.head.project(self.encode_two_stream(prefix, ids, ids.shape[1], padding))  # (B, n, D)
        return self.head.logits(query.flatten(0, 1), vocabulary, "caption").unflatten(0, ids.shape)

    def mlm_logits(self, ids: torch.Tensor, padding: torch.Tensor | None, selected: torch.Tensor,
                   vocabulary: torch.Tensor) -> torch.Tensor:
        """Masked language modelling: ids (B, L) with <|spe|> at masked words; ``selected`` marks the positions to
        score, as a (B, L) bool mask or as their (M,) indices in the flattened (B * L) text (what training passes:
        a mask's count is data the device would have to hand back to the host). Returns logits (M, V) for the M
        selected positions, in row-major order."""
        out = self.encode_text_tokens(ids, padding, routing=Routing(("text_input",)), side="input")[:, 1:]
        scored = out[selected] if selected.dtype == torch.bool else out.flatten(0, 1).index_select(0, selected)
        query = self.head.project(scored)
        return self.head.logits(query, vocabulary, "text_mlm")

    def cloze_logits(self, ids: torch.Tensor, padding: torch.Tensor | None, slots: torch.Tensor,
                     words: torch.Tensor) -> torch.Tensor:
        """Text classification as a cloze: prompts (B, L) with a <|spe|> at ``slots`` (B,), scored there against
        label-word features ``words`` (C, D) (:meth:`vocabulary_targets` of their token ids), as masked language
        modelling scores a masked word. Returns (B, C)."""
        positions = torch.arange(ids.shape[0], device=ids.device) * ids.shape[1] + slots
        return self.mlm_logits(ids, padding, positions, words)

    def vqa_logits(self, images: torch.Tensor, ids: torch.Tensor, padding: torch.Tensor | None, slots: torch.Tensor,
                   answers: torch.Tensor) -> torch.Tensor:
        """Visual question answering as a cloze on an image: [<|spe|>, image, question ids (B, L) with a <|spe|> at
        ``slots`` (B,)] through the encoder (the image and the question attend to each other), the slot's output
        scored against answer features ``answers`` (A, D) (:meth:`encode_text` of the answers, routed as word
        targets) at the downstream scale. images (B, 3, H, W). Returns (B, A)."""
        prefix = self.visual_prefix(images[:, None])
        p = prefix.shape[1]
        x = torch.cat([prefix, self.embed_text(ids)], dim=1)
        if padding is not None:
            padding = torch.cat([padding.new_zeros(ids.shape[0], p), padding], dim=1)
        out, _ = self.encode(x, padding=padding, routing=Routing(("caption_visual", "vqa_question"), (p,)))
        query = self.head.project(out[torch.arange(ids.shape[0], device=ids.device), p + slots])
        return self.head.logits(query, answers, "downstream")

    def answer_features(self, answers: Sequence[str] | torch.Tensor, padding: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """VQA answers (strings, or their ids (A, L) with padding) -> features (A, D), encoded as word targets."""
        return self.encode_text(answers, padding, routing=VOCABULARY)

    # ------------------------------------------------------------------ convenience inference
    @torch.inference_mode()
    def classify(self, inputs: torch.Tensor, labels: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Zero-shot classification. inputs: images (B, 3, H, W) or videos (B, T, 3, H, W), preprocessed;
        labels: class names, or their features (C, D). Returns probabilities (B, C). A prompt-tuned classifier
        maps names to its rows (:meth:`classifier_rows`); features are scored by position."""
        if isinstance(labels, torch.Tensor):
            return self.classification_logits(inputs, labels).softmax(dim=-1)
        rows = self.classifier_rows(labels)
        return self.classification_logits(inputs, self.encode_text(labels), rows).softmax(dim=-1)

    @torch.inference_mode()
    def caption(self, inputs: torch.Tensor, *, beam_size: int = 2, max_len: int = 21,
                targets: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> list[str]:
        """Captions for images (B, 3, H, W) or videos (B, T, 3, H, W), by cached beam search (``beam_size=1`` is
        greedy decoding) over ``targets`` (:meth:`caption_targets`; by default ``caption_vocabulary``'s)."""
        vocabulary, token_ids = targets or self.caption_targets(self.caption_vocabulary)
        result = beam_search(self, inputs, beam_size=beam_size, max_len=max_len, vocabulary=vocabulary,
                             token_ids=token_ids, use_cache=self.decodes_with_cache)
        return get_tokenizer().decode_batch(result.tokens, errors="ignore")

    @torch.inference_mode()
    def answer(self, images: torch.Tensor, question: str, answers: Sequence[str] | torch.Tensor, *,
               max_len: int = 23) -> torch.Tensor:
        """Visual question answering: the probabilities (B, A) of ``answers`` (strings, or their
        :meth:`answer_features`) to one ``question`` about each of the images (B, 3, H, W), preprocessed. The answer
        slot goes at the end of the question unless it holds one (<|spe|>); it is cut to ``max_len`` tokens (the
        reference's 23; at most the model's ``max_text_len``)."""
        tokenizer, limit = get_tokenizer(), min(max_len, self.config.max_text_len)
        prompt = question if SPE_ID in tokenizer.encode(question) else f"{question} <|spe|>"
        ids = torch.tensor(cloze_ids(tokenizer.encode(prompt), limit), device=self.device)
        ids = ids.expand(images.shape[0], -1)
        features = answers if isinstance(answers, torch.Tensor) else self.answer_features(answers)
        slots = (ids == SPE_ID).int().argmax(dim=1)
        return self.vqa_logits(images, ids, None, slots, features).softmax(dim=-1)

    @torch.inference_mode()
    def classify_text(self, prompts: Sequence[str], words: Sequence[str], *, max_len: int = 256) -> torch.Tensor:
        """Text classification as a cloze: the probabilities (N, C) of the label ``words`` (one token each) at the
        <|spe|> slot of each prompt (e.g. "a gripping film. It is <|spe|>." against "bad", "wonderful"); prompts are
        cut around their slot to ``max_len`` tokens (at most the model's ``max_text_len``). Raises ValueError for a
        prompt without a slot or a word of several tokens."""
        tokenizer, limit = get_tokenizer(), min(max_len, self.config.max_text_len)
        ids, padding = pad_rows([cloze_ids(tokenizer.encode(prompt), limit) for prompt in prompts])
        targets = self.vocabulary_targets(torch.tensor(label_word_ids(words), device=self.device))
        slots = (ids == SPE_ID).int().argmax(dim=1)
        logits = self.cloze_logits(ids.to(self.device), padding.to(self.device), slots.to(self.device), targets)
        return logits.softmax(dim=-1)

    def num_parameters(self) -> int:
        """Unique parameter elements (tied tensors counted once)."""
        return sum(p.numel() for p in self.parameters())
