"""PEFT habits for apply_lora / apply_mora: PEFT's keyword names (lora_alpha, lora_dropout) as
aliases, a ``peft.LoraConfig`` in place of the keywords, and a clear TypeError for any other
keyword, instead of the raw "unexpected keyword argument" of the layer constructor."""

from __future__ import annotations

import inspect

ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
_INITS = {True: "kaiming", "gaussian": "gaussian"}
# LoraConfig fields fusedpeft does not implement, with the value that means "off".
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "exclude_modules": None, "target_parameters": None}


def is_peft_config(value) -> bool:
    """A PEFT config object (it has a peft_type), e.g. peft.LoraConfig."""
    return getattr(value, "peft_type", None) is not None and not isinstance(value, (str, list, tuple, set))


def from_lora_config(where: str, config) -> dict:
    """apply_lora's keywords from a peft.LoraConfig: target_modules, r, alpha, dropout, use_rslora,
    use_dora, init. Raises TypeError for another PEFT method, ValueError for options fusedpeft does
    not implement (bias, fan_in_fan_out, modules_to_save, per-layer patterns, a regex string)."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        raise TypeError(f"{where}: got a PEFT config of peft_type {peft_type!r}; only a peft.LoraConfig is accepted")
    for field, off in _UNSUPPORTED.items():
        value = getattr(config, field, off)
        if value not in (off, None) and not (isinstance(value, (dict, list, set)) and not value):
            raise ValueError(f"{where}: the LoraConfig sets {field}={value!r}, which fusedpeft does not implement; "
                             f"leave it at {off!r}")
    targets = config.target_modules
    if isinstance(targets, str):
        raise ValueError(f"{where}: the LoraConfig's target_modules={targets!r} is a string (PEFT reads it as a "
                         f"regular expression or 'all-linear'); pass a list of module names such as ['q_proj', 'v_proj']")
    init = config.init_lora_weights
    if init not in _INITS:
        raise ValueError(f"{where}: the LoraConfig sets init_lora_weights={init!r}; fusedpeft implements True "
                         f"(kaiming A, zero B) and 'gaussian'")
    return {"target_modules": sorted(targets) if targets is not None else None, "r": config.r,
            "alpha": config.lora_alpha, "dropout": config.lora_dropout, "use_rslora": bool(config.use_rslora),
            "use_dora": bool(getattr(config, "use_dora", False)), "init": _INITS[init]}


def layer_keywords(layer_class, named: dict) -> tuple[str, ...]:
    """The keyword arguments of ``layer_class.__init__`` other than base and those in ``named``."""
    params = inspect.signature(layer_class.__init__).parameters
    return tuple(n for n, p in params.items() if n not in ("self", "base", *named)
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def adapter_arguments(where: str, given: dict, defaults: dict, kw: dict, allowed: tuple[str, ...]) -> dict:
    """The keywords apply_lora / apply_mora run with.

    ``given`` holds the named arguments as called (target_modules, r, alpha / mora_type, dropout),
    ``defaults`` their defaults, ``kw`` the rest. A peft config passed as target_modules replaces
    them (no other adapter keyword may be given next to it); lora_alpha / lora_dropout stand for
    alpha / dropout (giving both forms with different values is a TypeError); a keyword outside
    ``allowed`` is a TypeError that lists what is accepted.
    """
    out, kw = dict(given), dict(kw)
    if is_peft_config(given.get("target_modules")):
        if "alpha" not in defaults:
            raise TypeError(f"{where}: a peft config can only be given to apply_lora")
        extra = sorted({k for k in given if k != "target_modules" and given[k] != defaults[k]}
                       | (set(kw) & (set(ALIASES) | {"use_rslora", "use_dora", "init"})))
        if extra:
            raise TypeError(f"{where}: pass either a peft.LoraConfig or LoRA keywords, not both; got {extra} next "
                            f"to the config")
        out.update(from_lora_config(where, given["target_modules"]))
    for alias, name in ALIASES.items():
        if alias not in kw:
            continue
        if name not in defaults:
            raise TypeError(f"{where}: {alias} is a LoRA keyword; this adapter takes {sorted(defaults)}")
        value = kw.pop(alias)
        if out[name] != defaults[name] and out[name] != value:
            raise TypeError(f"{where}: got {name}={out[name]!r} and {alias}={value!r}; give one of them")
        out[name] = value
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        names = [n if n not in ALIASES.values() else f"{n} (or {next(a for a, b in ALIASES.items() if b == n)})"
                 for n in defaults]
        raise TypeError(f"{where}: unexpected keyword(s) {unknown}; accepted: {', '.join(names + list(allowed))}"
                        + (", or a peft.LoraConfig as the second argument" if "alpha" in defaults else ""))
    out.update(kw)
    return out
