"""Everything written beside the tensors: config.json (layer count, vocabulary size,
dtype), the tokenizer and chat template, the model card and the config itself."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import List, Optional

import yaml

from .schema import MergeConfig, ModelRef

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)

# A few well-known chat formats by name (written here from the formats' public definitions).
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def fix_config_json(out: Path, plan, cfg: MergeConfig, vocab_size: Optional[int]) -> None:
    f = out / "config.json"
    if not f.is_file():
        return
    data = json.loads(f.read_text())
    donor = plan.donor
    key = donor.num_layers_key
    if key and key in data:
        data[key] = plan.out_layers
    lt = data.get("layer_types")
    if isinstance(lt, list) and plan.layer_origin:
        new = []
        for info, idx in plan.layer_origin:
            src = info.config.get("layer_types")
            new.append(src[idx] if isinstance(src, list) and idx < len(src) else (lt[min(idx, len(lt) - 1)] if lt else None))
        data["layer_types"] = new
    for (section, k), n in getattr(plan, "module_layers", {}).items():
        if isinstance(data.get(section), dict) and k in data[section]:
            data[section][k] = n
    if vocab_size is not None and "vocab_size" in data:
        data["vocab_size"] = vocab_size
    f.write_text(json.dumps(data, indent=2) + "\n")


def model_folder(ref: ModelRef) -> Path:
    return _folder(ref)


def _folder(ref: ModelRef) -> Path:
    p = Path(ref.path)
    return p if p.is_dir() else p.parent


def _chat_template_of(folder: Path) -> Optional[str]:
    j = folder / "chat_template.jinja"
    if j.is_file():
        return j.read_text()
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text()).get("chat_template")
        except ValueError:
            return None
        if isinstance(t, list):
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def resolve_chat_template(cfg: MergeConfig, where) -> Optional[str]:
    ct = cfg.chat_template
    if not ct:
        return None
    if ct == "auto":
        found = [t.strip() for t in (_chat_template_of(_folder(m)) for m in cfg.referenced_models()) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if ct in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[ct]
    if "{" not in ct or len(ct) < 20:
        raise where(("chat_template",), f"unknown chat template {ct!r}: give 'auto', one of {', '.join(sorted(BUILTIN_CHAT_TEMPLATES))}, "
                                        "or a Jinja template")
    return ct


def write_tokenizer(out: Path, tok_folder: Optional[Path], chat_template: Optional[str], builder=None) -> None:
    """Replaces the tokenizer files in `out` with those of `tok_folder`, or those `builder`
    writes (neither: no tokenizer)."""
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    if builder is not None:
        builder(out)
    elif tok_folder is None:
        return
    else:
        for name in TOKENIZER_FILES:
            f = tok_folder / name
            if f.is_file():
                shutil.copy2(f, out / name)
    if chat_template:
        (out / "chat_template.jinja").write_text(chat_template)
        tc = out / "tokenizer_config.json"
        if tc.is_file():
            data = json.loads(tc.read_text())
            data["chat_template"] = chat_template
            tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _model_list(cfg: MergeConfig) -> List[ModelRef]:
    return [m for m in cfg.referenced_models() if not (cfg.base_model and m.same(cfg.base_model))
            and not (isinstance(cfg.tokenizer_source, ModelRef) and m.same(cfg.tokenizer_source))]


def model_card(cfg: MergeConfig, config_yaml: str, name: str, method_used: str, hub_inputs=()) -> str:
    models = _model_list(cfg)
    base = cfg.base_model
    meta = {
        # hub inputs by repo id (the card's metadata takes ids; revisions are listed below)
        "base_model": [str(m).split("+")[0].rsplit("@", 1)[0] if m.label else str(m)
                       for m in ([base] if base else []) + models],
        "library_name": "transformers",
        "tags": ["merge_fast", "mergekit", "merge"],
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# {name}",
        "",
        "This model is a merge of pre-trained language models made with "
        "merge_fast from a mergekit-compatible configuration.",
        "",
        "## Merge details",
        "",
        "### Method",
        "",
        f"Merged with the **{cfg.merge_method}** method"
        + (f", using `{base}` as the base model." if base else "."),
    ]
    if method_used != cfg.merge_method:
        lines += ["", f"(Computed with merge_fast's `{method_used}` kernel, which gives the same result here.)"]
    lines += ["", "### Models merged", ""]
    # (a hub reference's label already shows its +adapter as written)
    lines += [f"- `{m}`" + (" (with LoRA adapter `%s`)" % m.lora if m.lora and not m.label else "")
              for m in models] or ["- (base only)"]
    if base is not None and base.lora and not base.label:
        lines += [f"- base `{base.path}` with LoRA adapter `{base.lora}`"]
    params = cfg.parameters or {}
    if params:
        lines += ["", "### Parameters", ""]
        lines += [f"- `{k}`: `{json.dumps(v)}`" for k, v in params.items()]
    if cfg.slices:
        lines += ["", "### Layers", "", f"{len(cfg.slices)} slice(s):", ""]
        for sl in cfg.slices:
            lines.append("- " + ", ".join(f"`{s.model}` layers {s.layer_range[0]}-{s.layer_range[1] - 1}" for s in sl.sources))
    if hub_inputs:
        lines += ["", "### Hub inputs", "", "Resolved on the Hugging Face Hub to these commits (pin them with `@commit` "
                  "to repeat this merge exactly):", ""]
        lines += [f"- `{h.repo_id}`" + (f" `{h.filename}`" if h.filename else "")
                  + f" (revision `{h.revision or 'main'}`): commit `{h.commit}`" for h in hub_inputs]
    lines += ["", "### Configuration", "", "The following YAML configuration was used to produce this model:", "",
              "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def config_text(cfg: MergeConfig) -> str:
    if cfg.src.text is not None:
        return cfg.src.text
    return yaml.safe_dump(cfg.src.data, sort_keys=False)
