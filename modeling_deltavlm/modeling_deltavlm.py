"""PyTorch DeltaVLM: instruction-guided change analysis of a bi-temporal image pair.

    before ─┐                              ┌─ Z_before ─┐
            ├─ ViT (one batched call) ─ ln ─ CSRM ─────┤ concat ─ Q-Former(queries + instruction)
    after ──┘                              └─ Z_after ──┘                  │
                                                            language_projection
                                                                           │
                          [Q projected queries][</s> prompt ...] ─ language model ─ text

Shape legend (used in comments): B batch, S tokens per image incl. CLS (257 at 224px),
D vision width (1408), Q query tokens (32), Hq Q-Former width (768), T text length,
H language-model width (4096), V language-model vocabulary.

The vision tower and Q-Former are transformers' InstructBLIP modules under InstructBLIP's
attribute names, so an InstructBLIP checkpoint loads into everything but the difference module.
"""

import os
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.instructblip.modeling_instructblip import (
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
)
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_deltavlm import DeltaVLMConfig

# The Auto classes a saved folder names in config.json's `auto_map`, so that each loads it with trust_remote_code=True
# where this package is not installed, as each does where it is (`import modeling_deltavlm` registers both).
# `register_for_auto_class` keeps only one class per model class; `save_pretrained` adds the others.
AUTO_MAP_MODEL_CLASSES = ("AutoModel", "AutoModelForImageTextToText")


@dataclass
class DeltaVLMVisionOutput(ModelOutput):
    r"""
    The vision side of DeltaVLM for one batch of pairs: everything that does not depend on the instruction,
    so it can be computed once per pair and reused across dialogue turns.

    pair_embeds (`torch.FloatTensor` of shape `(batch_size, 2 * S, D)`):
        The difference module's output, `cat([Z_before, Z_after], dim=1)`: what the Q-Former attends to.
    before_embeds (`torch.FloatTensor` of shape `(batch_size, S, D)`):
        `ln_vision(ViT(before))`, the difference module's input for image A.
    after_embeds (`torch.FloatTensor` of shape `(batch_size, S, D)`):
        `ln_vision(ViT(after))`, the difference module's input for image B.
    vision_hidden_states (`torch.FloatTensor` of shape `(batch_size, 2, S, D)`):
        The ViT's last hidden state for both images, before `ln_vision`.
    """

    pair_embeds: torch.FloatTensor | None = None
    before_embeds: torch.FloatTensor | None = None
    after_embeds: torch.FloatTensor | None = None
    vision_hidden_states: torch.FloatTensor | None = None


@dataclass
class DeltaVLMImageFeatures(ModelOutput):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(batch_size, Q, H)`):
        `language_projection(query_output)`: the soft visual prompt written over the image placeholder tokens.
    query_output (`torch.FloatTensor` of shape `(batch_size, Q, Hq)`):
        The Q-Former's last hidden state at the query positions.
    qformer_outputs (`BaseModelOutputWithPoolingAndCrossAttentions`):
        The Q-Former's full output (query rows followed by instruction rows).
    vision_outputs (`DeltaVLMVisionOutput`):
        The instruction-independent vision side (None fields when it was passed in precomputed, except `pair_embeds`).
    """

    pooler_output: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    vision_outputs: DeltaVLMVisionOutput | None = None


@dataclass
class DeltaVLMCausalLMOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Mean next-token cross-entropy over the positions whose label is not -100.
    logits (`torch.FloatTensor` of shape `(batch_size, T, V)`):
        Language-model scores (before softmax).
    cache (`Cache`, *optional*):
        The language model's key/value cache, for generation.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The language model's hidden states, when `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        The language model's attention weights, when `output_attentions=True`.
    image_features (`DeltaVLMImageFeatures`, *optional*):
        Vision, difference-module and Q-Former outputs of this call (None on decoding steps).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_features: DeltaVLMImageFeatures | None = None


class DeltaVLMDifferenceModule(nn.Module):
    r"""
    CSRM, the cross-semantic relation measuring module of DeltaVLM. With X_A, X_B the
    `ln_vision` features of the before and after images (CLS token included) and weights shared by both:

        D   = X_B - X_A
        C_t = dropout(tanh(context1(D) + context2(X_t)))      (contextual semantics of the difference)
        G_t = dropout(sigmoid(gate1(D) + gate2(X_t)))         (how relevant each feature is to the change)
        S_t = G_t * C_t                                       (gated change semantics)
        Z_t = context3(cat[X_t, D, S_t])                      for t in {A, B}

    and the output is cat[Z_A, Z_B] along the token axis. The sub-layer names are the released
    checkpoint's keys, so conversion is a prefix rename.
    """

    def __init__(self, config: DeltaVLMConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.context1 = nn.Linear(width, width, bias=False)  # difference -> context
        self.context2 = nn.Linear(width, width)  # image -> context
        self.gate1 = nn.Linear(width, width, bias=False)  # difference -> gate
        self.gate2 = nn.Linear(width, width)  # image -> gate
        self.context3 = nn.Linear(3 * width, width)  # [image, difference, gated semantics] -> output
        self.dropout = nn.Dropout(config.difference_dropout)

    def forward(self, before_embeds: torch.Tensor, after_embeds: torch.Tensor) -> torch.Tensor:
        """(B, S, D), (B, S, D) -> (B, 2*S, D)"""
        difference = after_embeds - before_embeds  # (B, S, D)
        difference_context = self.context1(difference)
        difference_gate = self.gate1(difference)
        outputs = []
        for image_embeds in (before_embeds, after_embeds):
            context = self.dropout(torch.tanh(difference_context + self.context2(image_embeds)))
            gate = self.dropout(torch.sigmoid(difference_gate + self.gate2(image_embeds)))
            fused = torch.cat([image_embeds, difference, gate * context], dim=-1)  # (B, S, 3*D)
            outputs.append(self.context3(fused))  # (B, S, D)
        return torch.cat(outputs, dim=1)  # (B, 2*S, D)


class DeltaVLMPreTrainedModel(PreTrainedModel):
    config: DeltaVLMConfig
    config_class = DeltaVLMConfig
    base_model_prefix = "deltavlm"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _no_split_modules = [
        "InstructBlipEncoderLayer",
        "InstructBlipQFormerEmbeddings",
        "InstructBlipQFormerLayer",
        "DeltaVLMDifferenceModule",
    ]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeltaVLMDifferenceModule):
            # torch's default Linear init, as the authors' CSRM starts from (the converter's
            # "was CSRM trained?" check relies on that range: |w| <= 1/sqrt(fan_in)).
            for linear in (module.context1, module.context2, module.gate1, module.gate2, module.context3):
                init.kaiming_uniform_(linear.weight, a=5**0.5)
                if linear.bias is not None:
                    bound = linear.in_features**-0.5
                    init.uniform_(linear.bias, -bound, bound)
        elif isinstance(module, DeltaVLMForConditionalGeneration):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)


class DeltaVLMForConditionalGeneration(DeltaVLMPreTrainedModel, GenerationMixin):
    r"""
    DeltaVLM: two images (before, after) and an instruction in, text out. Uses the stock `generate()`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> import modeling_deltavlm  # registers DeltaVLM with the Auto classes

    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/deltavlm")
    >>> processor = AutoProcessor.from_pretrained("path/to/deltavlm")
    >>> pair = (Image.open("A/test_000001.png"), Image.open("B/test_000001.png"))
    >>> prompt = processor.apply_chat_template(
    ...     [{"role": "user", "content": "Please briefly describe the changes in these two images."}]
    ... )
    >>> inputs = processor(images=[pair], text=[prompt], return_tensors="pt")
    >>> output_ids = model.generate(**inputs, max_new_tokens=30)
    >>> processor.batch_decode(output_ids, skip_special_tokens=True, prompt_length=inputs["input_ids"].shape[1])
    ```
    """

    def __init__(self, config: DeltaVLMConfig):
        super().__init__(config)
        self.vision_model = InstructBlipVisionModel._from_config(config.vision_config)
        # The vision model's post_layernorm plays LAVIS' `ln_vision`, whose eps is torch's default 1e-5,
        # not the ViT's 1e-6 (the checkpoint was trained with 1e-5).
        self.vision_model.post_layernorm.eps = config.ln_vision_eps
        self.difference_module = DeltaVLMDifferenceModule(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        if config.language_model_weights:
            # the folder holds no language-model weights: `from_pretrained` fills them from the reference
            self._keys_to_ignore_on_load_missing = {*self._keys_to_ignore_on_load_missing, r"^language_model\."}

    # --- embeddings plumbing (resize_token_embeddings, tying, generation) ---

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # --- the paper's trainable set ---

    def set_trainable_as_paper(self) -> dict[str, int]:
        """Freeze what the paper freezes and return the trainable parameter count per component.

        Trainable: the last `config.num_trainable_vision_layers` ViT blocks (all of them plus the patch and
        position embeddings when that number is the ViT's depth), `ln_vision`, the difference
        module, the query tokens, the Q-Former and the projection. Frozen: the rest of the ViT and the
        language model.
        """
        self.requires_grad_(False)
        num_trainable = self.config.num_trainable_vision_layers
        vision_layers = self.vision_model.encoder.layers
        trainable = {
            "vision_layers": list(vision_layers)[len(vision_layers) - num_trainable :],
            # all blocks trainable means the ViT is trained from scratch (DeltaVLM-Nano): its embeddings too
            "vision_embeddings": [self.vision_model.embeddings] if num_trainable == len(vision_layers) else [],
            "ln_vision": [self.vision_model.post_layernorm],
            "difference_module": [self.difference_module],
            "qformer": [self.qformer],
            "language_projection": [self.language_projection],
        }
        for modules in trainable.values():
            for module in modules:
                module.requires_grad_(True)
        self.query_tokens.requires_grad_(True)
        for layer in trainable["vision_layers"]:
            _freeze_key_bias(layer.self_attn)
        counts = {
            name: sum(p.numel() for module in modules for p in module.parameters()) for name, modules in trainable.items()
        }
        counts["query_tokens"] = self.query_tokens.numel()
        counts["total"] = sum(counts.values())
        return counts

    # --- the vision side ---

    def get_pair_embeds(
        self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False
    ) -> DeltaVLMVisionOutput:
        r"""
        Run the ViT on both images in one batched call, `ln_vision`, then the difference module.

        pixel_values (`torch.FloatTensor` of shape `(batch_size, 2, num_channels, height, width)`):
            index 0 along dim 1 is the before image (A), index 1 the after image (B).

        Returns a [`DeltaVLMVisionOutput`] whose `pair_embeds` `(batch_size, 2 * S, D)` can be passed
        to `forward`/`generate` instead of `pixel_values` to skip the vision side on later dialogue turns.
        """
        image_size = self.config.vision_config.image_size
        # InstructBLIP's vision config has no channel count: its patch convolution is built for 3
        expected_shape = (self.vision_model.embeddings.patch_embedding.in_channels, image_size, image_size)
        _check_pixel_values(pixel_values, expected_shape, interpolate_pos_encoding)
        batch_size = pixel_values.shape[0]
        # step 1: both images through the ViT as one batch of 2B images: (2B, S, D)
        images = pixel_values.flatten(0, 1).to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        hidden_states = self.vision_model.embeddings(images, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.vision_model.encoder(inputs_embeds=hidden_states).last_hidden_state
        # step 2: ln_vision, then back to pairs: (B, 2, S, D)
        vision_embeds = self.vision_model.post_layernorm(hidden_states)
        vision_embeds = vision_embeds.unflatten(0, (batch_size, 2))
        before_embeds, after_embeds = vision_embeds[:, 0], vision_embeds[:, 1]
        # step 3: difference module (or the plain concatenation when it is switched off): (B, 2S, D)
        return DeltaVLMVisionOutput(
            pair_embeds=self.relate_pair(before_embeds, after_embeds),
            before_embeds=before_embeds,
            after_embeds=after_embeds,
            vision_hidden_states=hidden_states.unflatten(0, (batch_size, 2)),
        )

    def relate_pair(self, before_embeds: torch.FloatTensor, after_embeds: torch.FloatTensor) -> torch.FloatTensor:
        r"""
        The last step of `get_pair_embeds`: the difference module, or the plain concatenation when
        `config.use_difference_module` is off. Separate so that a caller holding the ViT outputs of a frozen vision
        side (the Nano warm-up's Q-Former phase caches them) still runs the module, dropout included.

        before_embeds, after_embeds (`torch.FloatTensor` of shape `(batch_size, S, D)`): `ln_vision` outputs.

        Returns `pair_embeds` of shape `(batch_size, 2 * S, D)`.
        """
        if self.config.use_difference_module:
            return self.difference_module(before_embeds, after_embeds)
        return torch.cat([before_embeds, after_embeds], dim=1)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        pair_embeds: torch.FloatTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> DeltaVLMImageFeatures:
        r"""
        The soft visual prompt for a batch of pairs and instructions.

        pixel_values (`torch.FloatTensor` of shape `(batch_size, 2, num_channels, height, width)`, *optional*):
            The pairs (before, after). Give either this or `pair_embeds`.
        qformer_input_ids (`torch.LongTensor` of shape `(batch_size, L)`):
            The instruction in the Q-Former's (BERT) vocabulary.
        qformer_attention_mask (`torch.LongTensor` of shape `(batch_size, L)`, *optional*):
            1 on instruction tokens, 0 on padding.
        pair_embeds (`torch.FloatTensor` of shape `(batch_size, 2 * S, D)`, *optional*):
            Precomputed `get_pair_embeds(pixel_values).pair_embeds`.
        """
        if (pixel_values is None) == (pair_embeds is None):
            raise ValueError("give exactly one of pixel_values and pair_embeds")
        if qformer_input_ids is None:
            raise ValueError("qformer_input_ids (the instruction in the Q-Former vocabulary) is required")
        if pixel_values is not None:
            vision_outputs = self.get_pair_embeds(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            pair_embeds = vision_outputs.pair_embeds
        else:
            if (pair_embeds.ndim != 3 or pair_embeds.shape[-1] != self.config.vision_config.hidden_size
                    or pair_embeds.shape[1] % 2):  # the two images' token sequences, concatenated
                raise ValueError(
                    f"pair_embeds must have shape (batch_size, 2 * tokens_per_image, {self.config.vision_config.hidden_size}),"
                    f" got {tuple(pair_embeds.shape)}"
                )
            # as pixel_values: precomputed features may come in another dtype (float32 cached for a bf16 model)
            pair_embeds = pair_embeds.to(self.qformer.dtype)
            vision_outputs = DeltaVLMVisionOutput(pair_embeds=pair_embeds)
        batch_size = pair_embeds.shape[0]
        if qformer_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"{batch_size} image pairs but {qformer_input_ids.shape[0]} Q-Former instructions (qformer_input_ids)"
            )
        # step 1: queries + instruction through the Q-Former; only the queries cross-attend to the pair
        query_tokens = self.query_tokens.expand(batch_size, -1, -1)  # (B, Q, Hq)
        query_mask = torch.ones(query_tokens.shape[:2], dtype=torch.long, device=query_tokens.device)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        attention_mask = torch.cat([query_mask, qformer_attention_mask.to(query_mask.device)], dim=1)  # (B, Q+L)
        pair_mask = torch.ones(pair_embeds.shape[:2], dtype=torch.long, device=pair_embeds.device)  # (B, 2S)
        qformer_outputs = self.qformer(
            input_ids=qformer_input_ids,
            attention_mask=attention_mask,
            query_embeds=query_tokens,
            encoder_hidden_states=pair_embeds,
            encoder_attention_mask=pair_mask,
            return_dict=True,
        )
        query_output = qformer_outputs.last_hidden_state[:, : query_tokens.shape[1]]  # (B, Q, Hq)
        # step 2: into the language model's embedding space: (B, Q, H)
        language_model_inputs = self.language_projection(query_output)
        return DeltaVLMImageFeatures(
            pooler_output=language_model_inputs,
            query_output=query_output,
            qformer_outputs=qformer_outputs,
            vision_outputs=vision_outputs,
        )

    # --- language model ---

    # `return_dict` is taken here (argument, else config.return_dict) and never reaches **kwargs: the language model
    # is always asked for its output object, whose fields forward reads.
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        pair_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> DeltaVLMCausalLMOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, T)`):
            Language-model tokens with `num_query_tokens` image placeholders (`config.image_token_id`) per row,
            as [`DeltaVLMProcessor`] builds them.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 2, num_channels, height, width)`, *optional*):
            The pairs: index 0 along dim 1 is the before image (A), index 1 the after image (B).
        attention_mask (`torch.LongTensor` of shape `(batch_size, T)`, *optional*): 1 on tokens, 0 on padding.
        qformer_input_ids / qformer_attention_mask (`torch.LongTensor` of shape `(batch_size, L)`):
            The instruction in the Q-Former's vocabulary; required with `pixel_values` or `pair_embeds`.
        pair_embeds (`torch.FloatTensor` of shape `(batch_size, 2 * S, D)`, *optional*):
            Precomputed [`~DeltaVLMForConditionalGeneration.get_pair_embeds`] output, instead of `pixel_values`.
        labels (`torch.LongTensor` of shape `(batch_size, T)`, *optional*):
            Target ids, -100 where no loss is taken (image tokens, prompt, padding). In training mode, with the
            default `logits_to_keep=0`, the LM head runs only on the N positions that predict a label, in chunks
            recomputed in backward (`chunked_lm_loss`), and the returned `logits` are None: the loss is the same
            and no (batch_size, T, V) logits are held. Language models that transform their logits (soft-capping,
            scaling) get the LM head on the K labelled columns instead, `logits` `(batch_size, K, V)`. Pass
            `logits_to_keep=T` (or use eval mode) for all T columns.
        return_dict (`bool`, *optional*, defaults to `config.return_dict`):
            False returns `DeltaVLMCausalLMOutput.to_tuple()` (its non-None fields, in order) instead of the object.
        """
        image_features = None
        if pixel_values is not None or pair_embeds is not None:
            if input_ids is None:
                raise ValueError("input_ids with image placeholder tokens are required to place the image features")
            image_features = self.get_image_features(
                pixel_values=pixel_values,
                qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask,
                pair_embeds=pair_embeds,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self._embed_with_image_features(input_ids, image_features)

        loss_columns = None
        restricted = labels is not None and self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0
        if restricted and self._plain_lm_head() is not None:
            return self._chunked_loss_forward(inputs_embeds, attention_mask, position_ids, labels, image_features,
                                              **kwargs)
        if restricted:
            # Training: only the columns that predict a labelled token need the LM head. The image tokens and the
            # prompt never do, so this skips most of the (B, T, V) logits, their float32 log-softmax and their
            # gradient: the largest tensors of a step once activation checkpointing is on. The loss is the same.
            loss_columns = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)  # (K,)
            logits_to_keep = loss_columns
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        loss = None
        if loss_columns is not None:
            loss = self.loss_function(
                logits=outputs.logits,
                labels=None,
                shift_labels=labels[:, loss_columns + 1],
                vocab_size=self.config.text_config.vocab_size,
                **kwargs,
            )
        elif labels is not None:
            loss = self.loss_function(
                logits=outputs.logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return DeltaVLMCausalLMOutput(
            loss=loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )

    def _plain_lm_head(self) -> nn.Linear | None:
        """The language model's LM head when its logits are exactly `lm_head(last_hidden_state)`, else None.

        Llama-family heads are; models that soft-cap or scale their logits (Gemma-2, Cohere, Granite) are not, and
        keep the labelled-columns path, which calls their own forward."""
        text = self.config.text_config
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            value = getattr(text, name, None)
            if value not in (None, 1, 1.0):
                return None
        head = self.language_model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or self.language_model.base_model is self.language_model:
            return None
        return head

    def _chunked_loss_forward(self, inputs_embeds, attention_mask, position_ids, labels, image_features, **kwargs):
        """Training step's loss with the LM head on the labelled positions only, chunk by chunk (see forward)."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.language_model.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            return_dict=True, **kwargs,
        )
        shift_labels = labels[:, 1:]
        labelled = shift_labels != -100  # (B, T-1)
        hidden = outputs.last_hidden_state[:, :-1][labelled]  # (N, H): columns t predict token t + 1
        loss = chunked_lm_loss(hidden, shift_labels[labelled], self._plain_lm_head(), num_items_in_batch)
        return DeltaVLMCausalLMOutput(
            loss=loss,
            logits=None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )

    def _embed_with_image_features(
        self, input_ids: torch.LongTensor, image_features: DeltaVLMImageFeatures | None
    ) -> torch.FloatTensor:
        """Token embeddings (B, T, H) with the projected queries written over the image placeholders."""
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        vocab_size = self.get_input_embeddings().num_embeddings
        outside = input_ids.masked_fill(image_mask, 0)
        if outside.numel() and (outside.max() >= vocab_size or outside.min() < 0):
            # an IndexError deep in the embedding otherwise; the usual cause is a processor and a model that
            # disagree on the image placeholder's id
            raise ValueError(
                f"input_ids hold id {int(outside.max() if outside.max() >= vocab_size else outside.min())} outside the "
                f"language model's vocabulary ({vocab_size}) that is not the image token (config.image_token_id = "
                f"{self.config.image_token_id}); is the processor's image_token_id the model's?"
            )
        # The placeholder id may lie outside the language model's vocabulary: look up a valid id there
        # instead; those rows are overwritten below anyway.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if image_features is None:
            if image_mask.any():
                raise ValueError(
                    "input_ids contain image placeholder tokens but neither pixel_values nor pair_embeds was given"
                )
            return inputs_embeds
        language_model_inputs = image_features.pooler_output  # (B, Q, H)
        if language_model_inputs.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{language_model_inputs.shape[0]} image pairs but {input_ids.shape[0]} text sequences (input_ids)"
            )
        num_placeholders = image_mask.sum(dim=1)
        if (num_placeholders != self.config.num_query_tokens).any():
            raise ValueError(
                f"each input_ids row needs exactly {self.config.num_query_tokens} image tokens "
                f"(id {self.config.image_token_id}); found {num_placeholders.tolist()}. Build inputs with "
                "DeltaVLMProcessor, and leave room for the image tokens when truncating."
            )
        language_model_inputs = language_model_inputs.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), language_model_inputs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`. A folder whose config names `language_model_weights` (written by
        `deltavlm convert --no-llm`) holds no language-model weights: they are read from that reference."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        if model.config.language_model_weights:
            model._load_referenced_language_model(pretrained_model_name_or_path)
        return loaded

    def _load_referenced_language_model(self, folder) -> None:
        source = self.config.language_model_weights
        inside = os.path.join(str(folder), source) if folder is not None and not os.path.isabs(source) else None
        if inside is not None and os.path.isdir(inside):
            source = inside
        dtype = self.language_model.get_input_embeddings().weight.dtype
        # Free the placeholder weights first (keep shapes on meta), so the peak is one language model, not two.
        for module in self.language_model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        state_dict = reference.state_dict()
        del reference
        vocab_size = self.config.text_config.vocab_size
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in state_dict and state_dict[key].shape[0] < vocab_size:
                state_dict[key] = append_mean_rows(state_dict[key], vocab_size - state_dict[key].shape[0])
        try:
            self.language_model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(f"language_model_weights={source!r} does not fit this model's text_config: {error}") from error
        self.language_model.tie_weights()
        self.language_model.to(self.query_tokens.device)

    def save_pretrained(self, save_directory, *args, model_card: str | None = None, **kwargs):
        """transformers' `save_pretrained`, plus a model card (README.md with Hub metadata) when the folder has
        none. `model_card` replaces the generated card (the converter and the demo state their provenance).
        With `config.language_model_weights` set, the language model is left out (it is read from there)."""
        if self._auto_class is not None:  # the class ships its code (register_for_auto_class)
            self._add_auto_map_entries()
        if self.config.language_model_weights and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = {
                key: value for key, value in self.state_dict().items() if not key.startswith("language_model.")
            }
        super().save_pretrained(save_directory, *args, **kwargs)
        card_path = os.path.join(save_directory, "README.md")
        if model_card is not None or not os.path.exists(card_path):
            with open(card_path, "w", encoding="utf-8") as handle:
                handle.write(model_card if model_card is not None else default_model_card(self.config))

    def _add_auto_map_entries(self) -> None:
        # the name transformers' custom_object_save writes: module file (copied flat beside config.json) and class
        class_name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update({auto_class: class_name for auto_class in AUTO_MAP_MODEL_CLASSES})
        self.config.auto_map = auto_map

    def prepare_inputs_for_generation(self, *args, pair_embeds=None, is_first_iteration=False, **kwargs):
        # pixel_values are dropped after the prefill step by GenerationMixin; pair_embeds must be too,
        # or every decoding step would rerun the Q-Former.
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pair_embeds"] = pair_embeds
        return model_inputs


def default_model_card(config: DeltaVLMConfig, base_models: list[str] | None = None, description: str = "",
                       datasets: list[str] | None = None) -> str:
    """A model card with the Hub metadata (pipeline tag, license, base models, data sets) of a DeltaVLM folder."""
    text_base = getattr(config.text_config, "_name_or_path", "") or "lmsys/vicuna-7b-v1.5"
    base_models = base_models or [text_base]
    datasets = ["LEVIR-CC", "ChangeChat-105k"] if datasets is None else datasets
    front_matter = "\n".join(
        ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "license: apache-2.0", "base_model:"]
        + [f"- {name}" for name in base_models]
        + (["datasets:"] + [f"- {name}" for name in datasets] if datasets else [])
        + ["tags:", "- remote-sensing", "- change-detection", "- deltavlm", "---"]
    )
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    return f"""{front_matter}

# DeltaVLM

Instruction-guided remote-sensing change analysis (Deng, Zhou & Wu, arXiv 2507.22346): a (before, after)
image pair and an instruction in, text out. {description}

| part | size |
| --- | --- |
| vision | ViT, width {vision.hidden_size}, {vision.num_hidden_layers} blocks, {vision.image_size}px, patch {vision.patch_size} |
| difference module (CSRM) | {"on" if config.use_difference_module else "off (plain concatenation)"} |
| Q-Former | width {qformer.hidden_size}, {qformer.num_hidden_layers} layers, {config.num_query_tokens} queries |
| language model | {text.model_type}, width {text.hidden_size}, {text.num_hidden_layers} layers, vocabulary {text.vocab_size} |

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("<this folder or repo>", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("<this folder or repo>", trust_remote_code=True)
prompt = processor.apply_chat_template(
    [{{"role": "user", "content": "Please briefly describe the changes in these two images."}}]
)
inputs = processor(images=[("before.png", "after.png")], text=[prompt])
output_ids = model.generate(**inputs, max_new_tokens=60)
print(processor.batch_decode(output_ids, prompt_length=inputs["input_ids"].shape[1]))
```
"""


def chunked_lm_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Linear, num_items_in_batch=None,
                    chunk_logits: int = 2**22) -> torch.Tensor:
    """Cross-entropy of `lm_head(hidden)` against `targets` without holding all N x V logits.

    hidden (N, H), targets (N,). Rows go through the head in chunks of about `chunk_logits` logits; each chunk is
    recomputed in backward (activation checkpointing), so a step holds one chunk's float32 logits instead of N x V
    logits, their log-softmax and their gradient (the largest tensors of a Nano step once the layers are
    checkpointed). When one chunk holds all N rows there is nothing to save by recomputing, and the head runs once:
    on a 2-core CPU a Nano micro-batch's head (~40 rows x 49 152 tokens, its 113 MB weight read from memory) took
    50-85 ms a call, 3-4% of a training step. Same reduction as transformers' causal-LM loss: sum /
    num_items_in_batch when given (the Trainer, under gradient accumulation), else the mean over the N rows.
    """
    rows = max(1, chunk_logits // lm_head.out_features)
    if hidden.shape[0] <= rows:
        total = _summed_cross_entropy(hidden, targets, lm_head)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            total = total + torch.utils.checkpoint.checkpoint(
                _summed_cross_entropy, hidden[start : start + rows], targets[start : start + rows], lm_head,
                use_reentrant=False,
            )
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float()  # nothing labelled: zero, still connected to the graph
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / hidden.shape[0]


def _summed_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
    # float32 like transformers' loss, whatever the weights' dtype
    return nn.functional.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def append_mean_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`weight` (V, H) with `num_rows` rows appended, each the mean of the existing rows (computed in float32).

    This is the value of the `[PAD]` rows of the released checkpoint's input embedding and lm_head: the authors
    re-randomised them at every load (normal(0, 0.02)) and never saved them. The mean is deterministic, needs no
    storage (a `--no-llm` folder recomputes it from the base model), and as an lm_head row gives `[PAD]` the average
    logit, far below the top tokens, so generation never picks it.
    """
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(num_rows, -1)], dim=0)


def _check_pixel_values(
    pixel_values: torch.Tensor, expected_shape: tuple[int, int, int], interpolate_pos_encoding: bool = False
) -> None:
    """Refuse, by a ValueError naming both shapes, pixel_values that are not (B, 2, C, H, W) pairs of images of
    `expected_shape` (C, H, W): the ViT's input channels and `config.vision_config.image_size`. Otherwise a larger image fails deep in the ViT (position table of another length), a smaller one
    runs on a silently sliced position table, and other channel counts fail inside the patch convolution. Typical
    cause: an image processor whose `size` is not the model's `image_size`. With `interpolate_pos_encoding` the
    position table is resized to the image, so only the channels must match."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(
            "pixel_values must have shape (batch_size, 2, num_channels, height, width) — a (before, after) pair "
            f"per sample — got {shape}"
        )
    expected = tuple(expected_shape)
    given = tuple(pixel_values.shape[2:])
    if given[0] != expected[0] or (not interpolate_pos_encoding and given != expected):
        raise ValueError(
            f"pixel_values images must be (num_channels, height, width) = {expected} for this model "
            f"(config.vision_config), got {given} (pixel_values {tuple(pixel_values.shape)}): resize the images to "
            f"{expected[1]}x{expected[2]} (the image processor's `size`) and give {expected[0]} channels"
        )


def _freeze_key_bias(attention: nn.Module) -> None:
    """EVA's attention has q and v biases but no k bias; InstructBLIP stores cat(q_bias, 0, v_bias) as one
    trainable `qkv.bias`. Zero the gradient of the k third so it stays 0 as in the original (softmax makes
    its true gradient 0, but Adam would amplify rounding noise into real updates)."""
    bias = attention.qkv.bias
    if bias is None or getattr(bias, "_deltavlm_key_bias_frozen", False):
        return
    width = bias.shape[0] // 3
    mask = torch.ones_like(bias)
    mask[width : 2 * width] = 0
    bias.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    bias._deltavlm_key_bias_frozen = True


__all__ = [
    "append_mean_rows",
    "DeltaVLMDifferenceModule",
    "DeltaVLMForConditionalGeneration",
    "DeltaVLMPreTrainedModel",
]
