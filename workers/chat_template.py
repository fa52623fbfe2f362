"""The chat template that ships with a model's tokenizer files (a folder's chat_template.jinja or
tokenizer_config.json, a GGUF's metadata), read as transformers reads it. The verifier announces
it in its ReadyResult so that front ends, which never import transformers, can render chats.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("minedraft.workers")


def chat_template_info(path: str) -> dict:
    """{"chat_template": str | None, "bos_token": str | None, "eos_token": str | None} of the
    model folder or .gguf file at path; all None when it has no loadable tokenizer or template."""
    import transformers

    info = {"chat_template": None, "bos_token": None, "eos_token": None}
    model = Path(path).expanduser()
    try:
        if model.is_file():
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(model.parent), gguf_file=model.name, local_files_only=True)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    except Exception as exc:  # the tokenizer.json alone still serves completions
        log.warning("no chat template for %s: its tokenizer does not load (%s)", path, exc)
        return info
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one serves chats
        template = template.get("default")
    info["chat_template"] = template if isinstance(template, str) and template else None
    info["bos_token"] = tokenizer.bos_token if isinstance(tokenizer.bos_token, str) else None
    info["eos_token"] = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
    return info
