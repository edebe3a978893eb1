"""The ``merge_config:`` file and ``ModelMerger`` API of notebook merge tools, translated into a
native plan.

Strategies map onto registered methods: ``weighted`` is ``linear`` (``normalize`` =
``normalize_weights``), ``sequential`` is ``sequential`` without a base (r starts as the first
model), ``task_arithmetic`` is ``task_arithmetic`` with λ = ``scaling_factor`` and
``clamp_min``/``clamp_max`` = ``clamp_range``, and ``slerp`` is ``slerp_eps``. In ``weighted`` and
``task_arithmetic`` a model's weight is c_i = w_i (``add``) or −|w_i| (``subtract``).
``base_model`` is task_arithmetic's base and the others' ``donor`` (config, tokenizer and unmerged
tensors); ``merge_embeddings``/``merge_lm_head: false`` become ``select.keep_from_base``,
``preserve_tokenizer`` ``copy_tokenizer``, ``torch_dtype`` ``out_dtype``. Keys that only tune the
tool's memory or devices get one note each; keys with no meaning here are one-line errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from streammerge.engine import MergeResult
from streammerge.errors import MissingExtraError, PlanError
from streammerge.lora.adapter import CONFIG as ADAPTER_CONFIG
from streammerge.plan import MergePlan
from streammerge.plan.load import load_plan, read_documents

ROOT = "merge_config"
STRATEGIES = {"weighted": "linear", "sequential": "sequential", "task_arithmetic": "task_arithmetic",
              "slerp": "slerp_eps"}
VALIDATION_FILE = "validation.json"
_MODEL_KEYS = ("path", "weight", "name", "operation")
_OPTIONS = ("normalize_weights", "preserve_tokenizer", "merge_embeddings", "merge_lm_head")
_SECTIONS = {"weighted_options": ("normalize_weights",),
             "task_arithmetic_options": ("scaling_factor", "clamp_weights", "clamp_range"),
             "slerp_options": ("interpolation_factor", "normalize_before_slerp", "epsilon")}
_SECTION_STRATEGY = {"weighted_options": "weighted", "task_arithmetic_options": "task_arithmetic",
                     "slerp_options": "slerp"}
_PEFT_KEYS = ("merge_adapters", "adapter_names", "base_model_path")
_VALIDATION_KEYS = ("run_tests", "test_prompts", "max_new_tokens")
_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32",
           "float64": "float64"}
# The tool's memory and device knobs: streammerge streams whatever they say (one note each).
_STREAMS = "streammerge always streams one tensor chunk at a time"
_MEMORY_NOTES = {
    "low_memory_mode": f"low_memory_mode: {_STREAMS}, in bounded memory (--max-memory sets the budget)",
    "sequential_loading": f"sequential_loading: {_STREAMS}; no model is ever loaded whole",
    "gradient_checkpointing": "gradient_checkpointing: a merge computes no gradients; no effect",
    "device_map": f"device_map: {_STREAMS}; no model is placed on devices (device: cuda runs the "
                  "merge kernels on the GPU)",
    "use_safetensors": "use_safetensors: streammerge reads safetensors (and .bin files without running "
                       "pickle code) and always writes safetensors",
}
_MEMORY_KEYS = (*_MEMORY_NOTES, "torch_dtype", "device", "weight_decay")
_INTERNAL = ("extra", "root", "where")  # MergeConfig's fields that are no config keys
_MAPPINGS = ("options", "weighted_options", "task_arithmetic_options", "slerp_options", "peft_config",
             "validation")


@dataclass
class MergeConfig:
    """A ``merge_config:`` mapping. ``extra`` holds the other keys (memory and device knobs), which
    ``translate`` notes or refuses."""

    strategy: str
    models: list[dict[str, Any]]
    output_path: str | None = None
    base_model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    weighted_options: dict[str, Any] = field(default_factory=dict)
    task_arithmetic_options: dict[str, Any] = field(default_factory=dict)
    slerp_options: dict[str, Any] = field(default_factory=dict)
    slerp_factor: float | None = None
    peft_config: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the file's directory: relative model paths are tried from it too
    where: str = ""  # the file, for messages

    @classmethod
    def from_dict(cls, data: Any, where: str = "", root: Path | None = None) -> "MergeConfig":
        """From the mapping under ``merge_config:`` (or a whole document holding that key)."""
        if isinstance(data, dict) and ROOT in data:
            beside = [k for k in data if k != ROOT]
            if beside:
                raise PlanError(f"{_in(where)}{beside[0]}: unknown top-level key beside '{ROOT}:'; "
                                f"move it under '{ROOT}:' or drop it")
            data = data[ROOT]
        if not isinstance(data, dict):
            raise PlanError(f"{_in(where)}{ROOT}: expected a mapping with 'strategy' and 'models', "
                            f"got {data!r}")
        known = {f.name for f in fields(cls)} - set(_INTERNAL)
        for key in ("strategy", "models"):
            if key not in data:
                raise PlanError(f"{_in(where)}{ROOT}.{key}: missing; give 'strategy' "
                                f"({' | '.join(STRATEGIES)}) and 'models' (a list of {{path, weight}})")
        given = {k: ({} if v is None and k in _MAPPINGS else v) for k, v in data.items() if k in known}
        return cls(**given, extra={k: v for k, v in data.items() if k not in known}, root=root, where=where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        """From a YAML (or JSON) file whose root key is ``merge_config:``."""
        config = config_of(Path(path))
        if config is None:
            raise PlanError(f"{path}: not a ModelMerger config: expected one document whose root key is "
                            f"'{ROOT}:'")
        return config


def _in(where: str) -> str:
    """The message prefix naming the file, if the config came from one."""
    return f"{where}: " if where else ""


def is_model_merger(document: Any) -> bool:
    """Whether a YAML document is a ModelMerger config (its root key is ``merge_config``)."""
    return isinstance(document, dict) and ROOT in document


def config_of(source: Any) -> MergeConfig | None:
    """The ``MergeConfig`` of a ``merge_config:`` file or dict; None for any other plan."""
    if isinstance(source, dict):
        return MergeConfig.from_dict(source) if is_model_merger(source) else None
    if isinstance(source, (str, Path)):
        documents = read_documents(Path(source))
        if len(documents) == 1 and is_model_merger(documents[0]):
            return MergeConfig.from_dict(documents[0], str(source), Path(source).parent)
    return None


@dataclass
class Translation:
    plan: dict[str, Any]  # a native plan document
    output: str | None  # output_path
    notes: list[str]
    prompts: list[str] | None  # validation prompts, when run_tests
    max_new_tokens: int = 32


class _Reader:
    """Reads the config's values, each once, with errors that name the key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str) -> PlanError:
        return PlanError(f"{_in(self.where)}{ROOT}.{key}: {problem}")

    def mapping(self, value: Any, key: str, valid: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {value!r}")
        for k in value:
            if k not in valid:
                raise self.fail(f"{key}.{k}", f"unknown key (valid: {', '.join(valid)})")
        return value

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-8 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        return float(value)

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value


def translate(config: MergeConfig) -> Translation:
    """The native plan for ``config``; raises ``PlanError`` naming the key for what cannot be mapped."""
    r = _Reader(config.where)
    strategy = config.strategy
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise r.fail("strategy", f"unknown strategy {strategy!r} (valid: {', '.join(STRATEGIES)})")
    notes: list[str] = []
    plan: dict[str, Any] = {}
    options = r.mapping(config.options, "options", (*_OPTIONS, *_MEMORY_KEYS))
    sections = {name: r.mapping(getattr(config, name), name, keys) for name, keys in _SECTIONS.items()}
    for name, section in sections.items():
        if section and _SECTION_STRATEGY[name] != strategy:
            notes.append(f"{name}: used by strategy {_SECTION_STRATEGY[name]} only; this merge is {strategy}")
    _memory(r, {**{k: v for k, v in options.items() if k in _MEMORY_KEYS}, **config.extra}, plan, notes)
    if config.slerp_factor is not None and strategy != "slerp":
        notes.append(f"slerp_factor: used by strategy slerp only; this merge is {strategy}")

    models = _models(r, config, strategy, notes)
    base = config.base_model
    peft = r.mapping(config.peft_config, "peft_config", _PEFT_KEYS)
    models, base, adapter_output = _adapters(r, config, peft, models, base, notes)
    normalize = _normalize(r, options, sections["weighted_options"])
    if normalize is not None and strategy != "weighted":
        notes.append(f"normalize_weights: used by strategy weighted only; {strategy} does not divide "
                     "by the weights")
    normalize = True if normalize is None else normalize

    method = STRATEGIES[strategy]
    if strategy == "weighted":
        entries = [_entry(m, {"weight": _signed(m)}) for m in models]
        params: dict[str, Any] = {"normalize": normalize}
        if any(m["operation"] == "subtract" for m in models):
            notes.append(_subtracted(r, [e["parameters"]["weight"] for e in entries], normalize))
    elif strategy == "sequential":
        if "weight" in models[0]:
            notes.append(f"models[0].weight: the first model starts the sequence (r = {models[0]['path']}); "
                         "its weight is not used")
        # the method reads a weight per model; without a base the first one's is never used
        entries = [_entry(m, {"weight": m.get("weight", 1.0)}) for m in models]
        params = {}
    elif strategy == "task_arithmetic":
        entries, params = _task_arithmetic(r, models, sections["task_arithmetic_options"], base)
    else:
        entries, params = _slerp(r, config, models, sections["slerp_options"])

    plan |= {"merge_method": method, "parameters": params}
    if adapter_output:
        if strategy == "weighted":
            method, params = "task_arithmetic", {"normalize": normalize}
        elif strategy != "task_arithmetic":
            raise r.fail("peft_config.base_model_path", f"missing: strategy {strategy} of adapters is merged "
                         "on their base model; give it here (without it only weighted and task_arithmetic "
                         "combine the adapters into one adapter)")
        if params.get("clamp_min") is not None:
            raise r.fail("task_arithmetic_options.clamp_weights", "a clamped sum of adapters is no adapter; "
                         "give peft_config.base_model_path to fold them into the base, or drop the clamp")
        plan |= {"merge_method": method, "parameters": params, "base_model": base,
                 "adapters": [{"path": e["model"], **e["parameters"]} for e in entries],
                 "adapter_output": {"combination": "cat"}}
    else:
        plan["models"] = entries
        if strategy == "task_arithmetic":
            plan["base_model"] = base
        elif strategy == "slerp":
            plan["base_model"] = models[0]["path"]  # slerp_eps's t = 0 end
    _keep(r, options, plan, base)
    prompts, max_new = _validation(r, config.validation)
    if prompts is not None and adapter_output:
        raise r.fail("validation.run_tests", "the output is a combined adapter, not a model to generate "
                     "with; give peft_config.base_model_path to fold it into the base")
    names = [f"{m['name']} ({m['path']})" for m in config.models if isinstance(m, dict) and "name" in m]
    if names:
        notes.append(f"models' names label them only: {', '.join(names)}")
    return Translation(plan, config.output_path, notes, prompts, max_new)


def _memory(r: _Reader, given: dict[str, Any], plan: dict[str, Any], notes: list[str]) -> None:
    """The tool's memory and device keys (top level or under ``options``); anything else is unknown."""
    for key, value in given.items():
        if key in _MEMORY_NOTES:
            notes.append(_MEMORY_NOTES[key])
        elif key.endswith("batch_size"):
            notes.append(f"{key}: {_STREAMS}; there are no batches to size")
        elif key == "torch_dtype":
            name = str(value).removeprefix("torch.")
            if name == "auto":
                notes.append("torch_dtype: auto: the output keeps the inputs' dtype")
            elif name in _DTYPES:
                plan["out_dtype"] = _DTYPES[name]
                notes.append(f"torch_dtype: {value}: the output is written in {_DTYPES[name]} "
                             f"({_STREAMS}; nothing is loaded in it)")
            else:
                valid = ", ".join(sorted(set(_DTYPES.values())))
                raise r.fail(key, f"got {value!r}, expected one of {valid} or auto")
        elif key == "device":
            if value not in ("cpu", "cuda", "auto", "cuda:0"):
                raise r.fail(key, f"got {value!r}: the merge kernels run on cpu, cuda (the current CUDA "
                             "device: choose it with CUDA_VISIBLE_DEVICES) or auto")
            plan["device"] = "cuda" if value == "cuda:0" else value
        elif key == "weight_decay":
            if r.number(value, key) != 0:
                raise r.fail(key, f"{value!r}: a merge trains nothing, so weight decay has no meaning here; "
                             "set it to 0 or drop it")
            notes.append("weight_decay: 0: a merge trains nothing; no effect")
        else:
            valid = (*sorted(f.name for f in fields(MergeConfig) if f.name not in _INTERNAL),
                     *_MEMORY_KEYS, "*batch_size")
            raise r.fail(key, f"unknown key (valid: {', '.join(valid)})")


def _models(r: _Reader, config: MergeConfig, strategy: str, notes: list[str]) -> list[dict[str, Any]]:
    """Each model as {path, weight, operation}, checked."""
    if not isinstance(config.models, list) or not config.models:
        raise r.fail("models", f"expected a list of {{path, weight}}, got {config.models!r}")
    out = []
    for i, m in enumerate(config.models):
        at = f"models[{i}]"
        m = r.mapping(m, at, _MODEL_KEYS)
        if not isinstance(m.get("path"), str):
            raise r.fail(f"{at}.path", f"expected a model directory, got {m.get('path')!r}")
        entry: dict[str, Any] = {"path": m["path"], "operation": m.get("operation", "add")}
        if entry["operation"] not in ("add", "subtract"):
            raise r.fail(f"{at}.operation", f"got {entry['operation']!r}, expected add or subtract")
        if entry["operation"] == "subtract" and strategy not in ("weighted", "task_arithmetic"):
            raise r.fail(f"{at}.operation", f"subtract is a weight's sign: it needs strategy weighted or "
                         f"task_arithmetic (this merge is {strategy})")
        if "weight" in m:
            entry["weight"] = r.number(m["weight"], f"{at}.weight")
            if strategy == "sequential" and i > 0 and not 0 <= entry["weight"] <= 1:
                raise r.fail(f"{at}.weight", f"got {entry['weight']}, expected 0 <= weight <= 1 (how far the "
                             "result moves towards this model)")
            if strategy == "slerp":
                notes.append(f"{at}.weight: slerp interpolates by slerp_factor; the weight is not used")
        elif strategy in ("weighted", "task_arithmetic"):
            entry["weight"] = 1.0
        elif strategy == "sequential" and i > 0:
            raise r.fail(f"{at}.weight", "missing: sequential moves the result towards each later model by "
                         "its weight (0 to 1)")
        out.append(entry)
    if strategy == "slerp" and len(out) != 2:
        raise r.fail("models", f"slerp interpolates between exactly 2 models, got {len(out)}")
    return out


def _signed(model: dict[str, Any]) -> float:
    """c_i = w_i for ``add``, −|w_i| for ``subtract`` (so ``weight: -0.5, operation: subtract``
    subtracts, as the tool's examples mean)."""
    return -abs(model["weight"]) if model["operation"] == "subtract" else model["weight"]


def _subtracted(r: _Reader, weights: list[float], normalize: bool) -> str:
    """The note a weighted merge with a subtracted model gets: its coefficients, which sum to 1
    when normalized (an extrapolation away from the subtracted models)."""
    total = sum(weights)
    if normalize and abs(total) < 1e-12:
        raise r.fail("models", f"the signed weights {weights} sum to 0, so they cannot be normalized; "
                     "set weighted_options.normalize_weights: false, or change a weight")
    coefficients = [w / total for w in weights] if normalize else weights
    shown = ", ".join(f"{c:g}" for c in coefficients)
    return (f"operation: subtract: weighted merges Σ c_i x_i with the coefficients ({shown})"
            + (", normalized to sum to 1: an extrapolation away from the subtracted models"
               if normalize else ""))


def _entry(model: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {"model": model["path"], "parameters": params}


def _normalize(r: _Reader, options: dict, weighted: dict) -> bool | None:
    values = {f"{section}.normalize_weights": r.flag(s["normalize_weights"], f"{section}.normalize_weights")
              for section, s in (("options", options), ("weighted_options", weighted))
              if "normalize_weights" in s}
    if len(set(values.values())) > 1:
        raise r.fail("weighted_options.normalize_weights", f"{values} disagree; give one of them")
    return next(iter(values.values()), None)


def _task_arithmetic(r: _Reader, models: list[dict], opts: dict, base: str | None) -> tuple[list, dict]:
    if base is None:
        raise r.fail("base_model", "missing: task_arithmetic adds the models' differences from base_model "
                     "to it; give base_model")
    entries = [_entry(m, {"weight": _signed(m)}) for m in models]
    scale = r.number(opts.get("scaling_factor", 1.0), "task_arithmetic_options.scaling_factor")
    params: dict[str, Any] = {"lambda": scale, "normalize": False}
    clamp = r.flag(opts.get("clamp_weights", False), "task_arithmetic_options.clamp_weights")
    at = "task_arithmetic_options.clamp_range"
    if clamp:
        bounds = opts.get("clamp_range")
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise r.fail(at, f"clamp_weights needs clamp_range: [low, high], got {bounds!r}")
        low, high = (r.number(b, at) for b in bounds)
        if low > high:
            raise r.fail(at, f"[{low}, {high}]: low must not exceed high")
        params |= {"clamp_min": low, "clamp_max": high}
    elif "clamp_range" in opts:
        raise r.fail(at, "given without clamp_weights: true; set clamp_weights: true to clamp, or drop it")
    return entries, params


def _slerp(r: _Reader, config: MergeConfig, models: list[dict], opts: dict) -> tuple[list, dict]:
    factors = {}
    if config.slerp_factor is not None:
        factors["slerp_factor"] = r.number(config.slerp_factor, "slerp_factor")
    if "interpolation_factor" in opts:
        factors["slerp_options.interpolation_factor"] = r.number(opts["interpolation_factor"],
                                                                 "slerp_options.interpolation_factor")
    if len(set(factors.values())) > 1:
        raise r.fail("slerp_factor", f"{factors} disagree; give one of them")
    t = next(iter(factors.values()), 0.5)
    if not 0 <= t <= 1:
        raise r.fail(next(iter(factors)), f"got {t}, expected 0 <= t <= 1 (0: the first model, "
                     "1: the second)")
    epsilon = r.number(opts.get("epsilon", 1e-8), "slerp_options.epsilon")
    if epsilon < 0:
        raise r.fail("slerp_options.epsilon", f"got {epsilon}, expected a number >= 0")
    normalize = r.flag(opts.get("normalize_before_slerp", False), "slerp_options.normalize_before_slerp")
    return [_entry(m, {}) for m in models], {"t": t, "epsilon": epsilon, "normalize": normalize}


def _adapters(r: _Reader, config: MergeConfig, peft: dict, models: list[dict], base: str | None,
              notes: list[str]) -> tuple[list[dict], str | None, bool]:
    """Models that are PEFT adapter directories: with ``base_model_path`` each becomes the base
    with it folded in (``base+adapter``); without, the adapters are combined into one adapter."""
    root = config.root
    adapters = [i for i, m in enumerate(models) if _is_adapter(m["path"], root)]
    if not adapters:
        if peft:
            notes.append(f"peft_config: no model is a PEFT adapter directory ({ADAPTER_CONFIG}); "
                         "every model is merged as it is")
        return models, base, False
    if not peft.get("merge_adapters"):
        raise r.fail(f"models[{adapters[0]}].path", f"{models[adapters[0]]['path']} is a PEFT adapter "
                     f"({ADAPTER_CONFIG}): set peft_config.merge_adapters: true to merge adapters")
    names = peft.get("adapter_names", ["default"])
    if names != ["default"]:
        raise r.fail("peft_config.adapter_names", f"{names!r}: streammerge reads the adapter saved in each "
                     "model's directory (PEFT's 'default'); give a named adapter's own directory as the path")
    base_path = peft.get("base_model_path")
    if base_path is None:
        if len(adapters) != len(models):
            raise r.fail("peft_config.base_model_path", "missing: full models and adapters are merged on the "
                         "adapters' base model; give it")
        if base is None:
            raise r.fail("peft_config.base_model_path", "missing: the adapters are combined on their base "
                         "model's shapes; give base_model_path (the output is then the base with them folded "
                         "in) or base_model (the output is the combined adapter)")
        return models, base, True
    folded = [{**m, "path": f"{base_path}+{m['path']}"} if i in adapters else m for i, m in enumerate(models)]
    return folded, base if base is not None else base_path, False


def _is_adapter(path: str, root: Path | None) -> bool:
    candidates = [Path(path).expanduser()] + ([root / path] if root is not None else [])
    return any((c / ADAPTER_CONFIG).is_file() for c in candidates)


def _keep(r: _Reader, options: dict, plan: dict, base: str | None) -> None:
    """merge_embeddings / merge_lm_head: false keep those tensors from the base (else the first
    model), and preserve_tokenizer copies that model's tokenizer files: the plan's base for
    task_arithmetic, its ``donor`` for the strategies that merge no base."""
    kept = [kind for key, kind in (("merge_embeddings", "embeddings"), ("merge_lm_head", "lm_head"))
            if not r.flag(options.get(key, True), f"options.{key}")]
    plan["copy_tokenizer"] = r.flag(options.get("preserve_tokenizer", True), "options.preserve_tokenizer")
    if "adapters" in plan:  # the output is the combined adapter of base_model
        if kept:
            raise r.fail(f"options.merge_{kept[0]}", "false: the output is an adapter, which holds no "
                         "embeddings or lm_head of its own to keep; drop it")
        return
    if kept:
        plan["select"] = {"keep_from_base": kept}
    if base is not None and plan["merge_method"] != "task_arithmetic":
        plan["donor"] = base


def _validation(r: _Reader, validation: dict) -> tuple[list[str] | None, int]:
    v = r.mapping(validation, "validation", _VALIDATION_KEYS)
    run = r.flag(v.get("run_tests", False), "validation.run_tests")
    prompts = v.get("test_prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise r.fail("validation.test_prompts", f"expected a list of strings, got {prompts!r}")
    max_new = v.get("max_new_tokens", 32)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise r.fail("validation.max_new_tokens", f"got {max_new!r}, expected a positive integer")
    if run and not prompts:
        raise r.fail("validation.test_prompts", "run_tests: true needs test_prompts to continue")
    if prompts and not run:
        raise r.fail("validation.run_tests", "test_prompts given without run_tests: true; set it to "
                     "generate from them, or drop them")
    return (prompts if run else None), max_new


class ModelMerger:
    """``ModelMerger(MergeConfig(...)).merge()``: the tool's API over streammerge's merge."""

    def __init__(self, config: MergeConfig | dict[str, Any]):
        self.config = config if isinstance(config, MergeConfig) else MergeConfig.from_dict(config)

    def plan(self, strict: bool | None = None, cache_dir: str | None = None) -> tuple[MergePlan, Translation]:
        """The validated native plan (model paths resolved from the current directory, then the
        file's) and the translation it came from."""
        t = translate(self.config)
        return load_plan(t.plan, strict, cache_dir, root=self.config.root,
                         where=self.config.where or "plan"), t

    def merge(self, output: str | Path | None = None, **options: Any) -> MergeResult:
        """Merge into ``output`` (or the config's ``output_path``) and return the result, the
        translation's notes first; with ``validation.run_tests``, the continuations of
        ``test_prompts`` are written to ``OUTPUT/validation.json``. ``options`` are
        ``streammerge.merge``'s."""
        from streammerge.api import merge

        plan, t = self.plan(options.get("strict"), options.get("cache_dir"))
        destination = output if output is not None else t.output
        if destination is None:
            raise PlanError(f"{_in(self.config.where)}{ROOT}.output_path: missing; set it or give an output "
                            "(streammerge run FILE OUT)")
        if t.prompts is not None:
            _check_transformers(self.config.where)  # before the merge, not after it
        result = merge(plan, destination, **options)
        if t.prompts is not None:
            write_validation(result.output, t.prompts, t.max_new_tokens, options.get("cache_dir"))
        return replace(result, notes=(*t.notes, *result.notes))


def _check_transformers(where: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"{_in(where)}{ROOT}.validation.run_tests: generating from the merged model "
                                "needs transformers: pip install 'streammerge[eval]'") from None


def write_validation(output: Path, prompts: list[str], max_new_tokens: int, cache_dir: str | None) -> None:
    """Greedy continuations of ``prompts`` by the merged model (``streammerge eval``'s layer
    stream), saved as ``output/validation.json``."""
    from streammerge.evaluation.evaluate import evaluate

    result = evaluate(output, prompts=prompts, max_new_tokens=max_new_tokens, cache_dir=cache_dir)
    rows = [{"prompt": g.prompt, "continuation": g.text, "tokens": g.tokens} for g in result.generations]
    (output / VALIDATION_FILE).write_text(json.dumps({"max_new_tokens": max_new_tokens, "generations": rows},
                                                     indent=2) + "\n")
