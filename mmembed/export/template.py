"""The chat template that renders a sentence-transformers / transformers message list as mmembed's own sequence.

sentence-transformers 6.3's ``Transformer`` module turns every input of a model whose processor has a chat template
into messages (``InputFormatter.batch_to_message``: ``[{"role": "user", "content": [{"type": "image", ...},
{"type": "text", "text": ...}]}]``) and a prompt into a leading ``system`` message
(``InputFormatter.prepend_prompt_to_messages``), then calls ``processor.apply_chat_template(..., tokenize=True)``
(``sentence_transformers/base/modules/transformer.py``, ``preprocess`` and ``_apply_chat_template``). transformers'
``ProcessorMixin.apply_chat_template`` renders the Jinja template, collects the images of the ``image`` items in order
and calls the processor on the rendered text with its default ``add_special_tokens`` (the tokenizer's BOS, if any, as
mmembed's :class:`~mmembed.processing.NativeProcessor` gets it), which expands each image text to its visual tokens.

The template here reproduces :meth:`mmembed.processing.base.BaseProcessor.layout` and
:meth:`mmembed.processing.NativeProcessor._join` (:func:`mmembed.types.layout_side`): the system text is the
instruction (stripped), the user texts are the row text (with mmembed's ``<image>`` placeholders, if any), every
image item counts as one image; images that start the row (all of them when the text has no placeholder) come first
as the model's lead image text, then ``instruction + " " + text``, the remaining placeholders become the model's image
text, then the EOS suffix. What it does not reproduce: mmembed cuts over-long *text* pieces to ``max_length`` text
tokens before the image expansion; sentence-transformers truncates the rendered, expanded sequence instead (equal for
rows within ``max_length``), see docs/export.md.
"""

from __future__ import annotations

import json

__all__ = ["mmembed_chat_template"]

_TEMPLATE = """{#- mmembed layout (docs/export.md): images first, then "instruction text", then the suffix -#}
{%- set ph = PLACEHOLDER -%}
{%- set ns = namespace(instr='', text='', n=0) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}
{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}
{%- for part in parts -%}
{%- if part['type'] == 'text' -%}
{%- if message['role'] == 'system' -%}{%- set ns.instr = ns.instr + part['text'] -%}
{%- else -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}
{%- elif part['type'] in ['image', 'image_url'] -%}{%- set ns.n = ns.n + 1 -%}
{%- else -%}{{ raise_exception('mmembed export: unsupported content type ' ~ part['type']) }}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- set count = ns.text.count(ph) -%}
{%- if count == 0 -%}{%- set full = ph * ns.n + ns.text -%}{%- set count = ns.n -%}
{%- else -%}{%- set full = ns.text -%}{%- endif -%}
{%- if count != ns.n -%}
{{- raise_exception('the text has ' ~ count ~ ' image placeholder(s) but ' ~ ns.n ~ ' image(s)') -}}
{%- endif -%}
{%- set st = namespace(rest=full.lstrip(), lead=0) -%}
{%- for i in range(ns.n) -%}
{%- if st.rest.startswith(ph) -%}{%- set st.lead = st.lead + 1 -%}{%- set st.rest = st.rest[ph|length:].lstrip() -%}
{%- endif -%}
{%- endfor -%}
{%- if st.lead == 0 -%}{%- set st.rest = full -%}{%- endif -%}
{%- set instr = ns.instr.strip() -%}
{%- set head = st.rest.split(ph)[0] -%}
{%- if instr or (JOIN_ALWAYS and head) -%}
{%- set body = instr + ((' ' + st.rest) if head else st.rest) -%}
{%- else -%}{%- set body = st.rest -%}{%- endif -%}
{{- LEAD_TEXT * st.lead + body.replace(ph, IMAGE_TEXT) + SUFFIX -}}"""


def mmembed_chat_template(
    placeholder: str, image_text: str, lead_text: str, suffix: str, join_always: bool = False
) -> str:
    """The Jinja chat template of one model, its constants baked in as JSON string literals.

    Args:
        placeholder: mmembed's image placeholder in texts (``model.image_placeholder``, ``<image>``).
        image_text: the model's text per inline image (Qwen2-VL ``<|vision_start|><|image_pad|><|vision_end|>``).
        lead_text: the text of each image that starts the row (``layout: vlm2vec``: ``"<|image_pad|> "``).
        suffix: appended after the text (the tokenizer's EOS with ``add_eos``, else empty).
        join_always: ``instruction + " " + text`` even with an empty instruction (``layout: vlm2vec``).
    """
    consts = {
        "PLACEHOLDER": placeholder,
        "IMAGE_TEXT": image_text,
        "LEAD_TEXT": lead_text,
        "SUFFIX": suffix,
    }
    out = _TEMPLATE
    for key, value in consts.items():
        out = out.replace(key, json.dumps(value))
    return out.replace("JOIN_ALWAYS", "true" if join_always else "false")
