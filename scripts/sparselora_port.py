"""SparseLoRA's own code (z-lab/sparselora), made importable on a CPU with transformers 5: what is ported and why.

:func:`load_spft` extracts SparseLoRA's ``spft/`` package from a git mirror or checkout (``--sparselora-src``; nothing
of it is vendored here), puts the shims below in ``sys.modules`` first, and imports it. Every SparseLoRA function
the head-to-head runs is its own, unchanged: the token split (``spft/api.py:_patch_spft_forward``), the patching
(``get_spft_model``), the SVD predictor (``spft/modules/svd.py``, ``pred.py:FFNPredictor``), the sparse MLP
(``spft/modules/mlp.py:SparseLlamaMLP``, ``linear.py:SparseLinear``, ``lora_forward``; or, with LoRA on the MLP,
``spft/modules/unsloth/mlp.py:UnslothSparseLlamaMLP`` and ``SparseLoRA_MLP``), the dense start
(``spft/callbacks.py:SPFTCallback``) and the defaults of its options (``spft/train/args.py``).

What cannot run here, and what stands in (references at commit f0e5c7d, 2025-07-05):

1. ``liger_kernel.ops.swiglu.LigerSiLUMulFunction`` (``spft/modules/mlp.py:7,12,101``, ``pred.py:5,10,153``): a
   Triton kernel; Triton launches on CUDA tensors only (and liger-kernel is not installed here). Stand-in: the
   same function in PyTorch, ``silu(a) * b``, with autograd's backward.
2. Imported, never called on this path: ``liger_kernel.transformers.liger_rotary_pos_emb`` (``attn.py:10``, Triton);
   ``transformers...modeling_llama.LlamaFlashAttention2`` (``mapping.py:17``, removed from transformers in 4.48;
   SparseLoRA pins 4.46.3); ``flash_attn.flash_attn_func`` (``unsloth/attn.py:11``, CUDA only);
   ``unsloth.kernels.fast_rope_embedding``, ``unsloth.kernels.fast_lora.apply_lora_qkv``,
   ``unsloth.models._utils`` (``unsloth/attn.py:5,29,38``). Stand-ins that raise if called. So SparseLoRA's
   sparse *attention* (QK/VO channels through flash-attn, ``attn.py``) is not run: its MLP sparsity only.
3. With LoRA on the MLP, SparseLoRA's HF path fails: ``SparseLlamaMLP._forward_block`` passes
   ``sparse_indices=`` to peft's ``lora.Linear``, whose forward it replaced by ``lora_forward(self, x,
   indices=None, *args, **kwargs)`` (``linear.py:44``); the keyword lands in ``kwargs``, the base layer runs dense
   (``linear.py:47``), and ``lora_A(x, indices, *args, **kwargs)`` raises ``TypeError: SparseLinear.forward() got
   multiple values for argument 'sparse_indices'`` (``linear.py:65``). Its shipped runs never hit this: their LoRA
   targets default to ``q_proj,k_proj,v_proj,o_proj`` (``args.py:14``), and with ``--enable-unsloth`` (LoRA on all
   seven projections, ``train/main.py:31-33``) the MLP is ``UnslothSparseLlamaMLP`` (``mapping.py:37-46``). That
   path is the one run here for MLP LoRA; it needs ``unsloth.kernels.utils`` (``get_lora_parameters``,
   ``matmul_lora``, ``fast_dequantize``, ``torch_amp_custom_fwd/bwd``) and ``unsloth.kernels.fast_lora``
   (``swiglu_fg_kernel``, ``swiglu_DWf_DW_dfg_kernel``): unsloth does not import without a GPU and the two swiglu
   functions are Triton kernels. Stand-ins: PyTorch written from their definitions (an unquantised weight, one
   active adapter), below.
4. ``wandb`` (``callbacks.py:5``): logging only; not installed here. Stand-in: a module whose ``run`` is None
   (``SPFTCallback.on_step_end`` then returns at once).
5. dtype: ``create_mlp_svd_pred`` casts each predictor to bfloat16 (``svd.py:60``) and SparseLoRA's entry point
   then casts the whole model to bfloat16 (``train/main.py:56``), so model and predictor agree. A CPU run trains
   in float32 (as ``sat-train sft`` does), so :func:`sparsify` makes the same cast to float32.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def source_commit(src: Path) -> str | None:
    """The commit of a git mirror or checkout at ``src`` (None for a plain folder)."""
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def extract(src: Path, commit: str = "HEAD") -> Path:
    """A folder holding SparseLoRA's ``spft/`` Python files: ``src`` itself if it is a checkout, else the files
    of ``commit`` written out of the git mirror ``src`` with ``git show`` (its test folder left out)."""
    if (src / "spft" / "api.py").is_file():
        return src
    listed = subprocess.run(
        ["git", "-C", str(src), "ls-tree", "-r", "--name-only", commit, "spft"], capture_output=True, text=True, check=True
    ).stdout.split()
    out = Path(tempfile.mkdtemp(prefix="spft_"))
    for name in listed:
        if name.endswith(".py") and not name.startswith("spft/test/"):
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(
                subprocess.run(["git", "-C", str(src), "show", f"{commit}:{name}"], capture_output=True, check=True).stdout
            )
    return out


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # accelerate's find_spec() checks need one
    module.__dict__.update(attrs)
    return module


def _needs_gpu(name: str):
    def unavailable(*args: Any, **kwargs: Any):
        raise NotImplementedError(f"{name} is a GPU kernel, not ported to the CPU (scripts/sparselora_port.py)")

    return unavailable


class _SiLUMul:
    """Stand-in for liger's ``LigerSiLUMulFunction`` (item 1)."""

    @staticmethod
    def apply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.silu(a) * b


def _get_lora_parameters(proj: torch.nn.Module):
    """unsloth's ``get_lora_parameters`` for an unquantised peft ``lora.Linear`` with its active adapter."""
    base = proj.get_base_layer()
    if proj.disable_adapters or proj.merged:
        return base.weight, None, None, None, None
    name = proj.active_adapters[0]
    return base.weight, None, proj.lora_A[name].weight, proj.lora_B[name].weight, proj.scaling[name]


def _matmul_lora(X, W, W_quant, A, B, s, out=None):
    """unsloth's ``matmul_lora``: ``X @ W.T + s * (X @ A.T) @ B.T`` (W, A, B in Linear layout, no quantisation)."""
    flat = X.reshape(-1, X.shape[-1])
    result = flat @ W.t()
    if A is not None:
        result = result.addmm(flat @ A.t().to(X.dtype), B.t().to(X.dtype), alpha=s)
    return result.view(*X.shape[:-1], -1) if X.dim() == 3 else result


def _fast_dequantize(W, quant_state=None, out=None, use_global_buffer=False):
    if quant_state is not None:
        raise NotImplementedError("quantised base weights are not ported (scripts/sparselora_port.py)")
    return W


def _swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """unsloth's ``swiglu_fg_kernel``: h = silu(e) * g."""
    return F.silu(e) * g


def _swiglu_backward(dw: torch.Tensor, e: torch.Tensor, g: torch.Tensor):
    """unsloth's ``swiglu_DWf_DW_dfg_kernel``: from dL/dh and (e, g), returns (h, dL/dg, dL/de)."""
    wide = torch.promote_types(e.dtype, torch.float32)  # the kernel computes in at least float32
    sig = torch.sigmoid(e.to(wide))
    f = (e.to(wide) * sig).to(e.dtype)
    de = (dw * g).to(wide) * sig * (1 + e.to(wide) * (1 - sig))
    return f * g, dw * f, de.to(e.dtype)


def _identity(fn):
    return fn


def install_shims() -> None:
    """Put the stand-ins of items 1-4 in place (idempotent); transformers, accelerate and peft are imported first,
    so their optional-package checks see the real environment, not the stand-ins."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama as llama

    if not hasattr(llama, "LlamaFlashAttention2"):
        llama.LlamaFlashAttention2 = type("LlamaFlashAttention2", (), {})  # no module is one: never wrapped
    swiglu = _module("liger_kernel.ops.swiglu", LigerSiLUMulFunction=_SiLUMul)
    kernels = _module("unsloth.kernels", fast_rope_embedding=_needs_gpu("unsloth fast_rope_embedding"))
    utils = _module(
        "unsloth.kernels.utils",
        get_lora_parameters=_get_lora_parameters,
        matmul_lora=_matmul_lora,
        fast_dequantize=_fast_dequantize,
        torch_amp_custom_fwd=_identity,
        torch_amp_custom_bwd=_identity,
    )
    fast_lora = _module(
        "unsloth.kernels.fast_lora",
        LoRA_MLP=None,
        swiglu_fg_kernel=_swiglu_forward,
        swiglu_DWf_DW_dfg_kernel=_swiglu_backward,
        apply_lora_qkv=_needs_gpu("unsloth apply_lora_qkv"),
    )
    stand_ins = {
        "wandb": _module("wandb", run=None),
        "liger_kernel": _module("liger_kernel"),
        "liger_kernel.ops": _module("liger_kernel.ops", swiglu=swiglu),
        "liger_kernel.ops.swiglu": swiglu,
        "liger_kernel.transformers": _module("liger_kernel.transformers", liger_rotary_pos_emb=_needs_gpu("liger rope")),
        "flash_attn": _module("flash_attn", flash_attn_func=_needs_gpu("flash_attn_func")),
        "unsloth": _module("unsloth", kernels=kernels),
        "unsloth.kernels": kernels,
        "unsloth.kernels.utils": utils,
        "unsloth.kernels.fast_lora": fast_lora,
        "unsloth.models": _module("unsloth.models"),
        "unsloth.models._utils": _module("unsloth.models._utils", xformers=None, __all__=["xformers"]),
    }
    for name, module in stand_ins.items():
        sys.modules.setdefault(name, module)


def load_spft(src: Path, commit: str = "HEAD") -> types.SimpleNamespace:
    """SparseLoRA's modules, imported from ``src`` (see :func:`extract`) with the shims installed."""
    install_shims()
    sys.path.insert(0, str(extract(src, commit)))
    import spft.api as api
    import spft.callbacks as callbacks
    from spft.train import args

    return types.SimpleNamespace(api=api, callbacks=callbacks, args=args)


def shipped_ratios(config: dict, num_layers: int) -> tuple[list[float], list[float]]:
    """(MLP, attention) sparsity per layer of a ``num_layers``-layer model from a SparseLoRA sparsity config made
    for another depth: each layer takes the ratio of the config's layer at the same relative depth (nearest). On
    Llama-3-8B's 32 layers -> 30 this keeps the first three and the last layer dense, as shipped."""
    sparsity = config["sparsity"]
    source = 1 + max(int(key.split(".")[1]) for key in sparsity)
    picks = [round(j * (source - 1) / max(1, num_layers - 1)) for j in range(num_layers)]
    mlp = [float(sparsity.get(f"layers.{i}.mlp", 0)) for i in picks]
    attention = [float(sparsity.get(f"layers.{i}.self_attn", 0)) for i in picks]
    return mlp, attention


class SparseLoRAModel:
    """A peft LoRA model with SparseLoRA applied by its own code; run its steps inside :meth:`active`.

    Without LoRA on the MLP: ``get_spft_model`` itself (the HF path), which replaces peft's ``lora.Linear.forward``
    on the class; :meth:`active` puts that replacement in place only while this model runs, so other models in the
    process keep peft's own forward. With LoRA on the MLP: each MLP becomes ``UnslothSparseLlamaMLP`` (the path
    ``get_spft_model`` takes under ``enable_unsloth``, item 3), attention stays peft's, and ``_patch_spft_forward``
    adds the token split, as ``get_spft_model`` does.
    """

    def __init__(self, spft: types.SimpleNamespace, model: torch.nn.Module, config: Any, lora_on_mlp: bool):
        import peft

        self.spft, self.config, self.lora_on_mlp = spft, config, lora_on_mlp
        self.callback = spft.api.get_spft_callback(config)
        lora = peft.tuners.lora
        self._classes = [lora.layer.Linear] + ([lora.Linear4bit] if hasattr(lora, "Linear4bit") else [])
        own = [cls.forward for cls in self._classes]
        if lora_on_mlp:
            from spft.modules.unsloth import UnslothSparseLlamaMLP
            from spft.utils import set_submodule

            for name, module in list(model.named_modules()):
                key = next((k for k in config.sparsity if k.endswith(".mlp") and name.endswith(k)), None)
                if key is not None:
                    wrapped = UnslothSparseLlamaMLP(
                        base=module, name=key, idx=int(key.split(".")[1]), sparsity=config.sparsity[key], cfg=config
                    )
                    set_submodule(model, name, wrapped)
            spft.api._patch_spft_forward(model, config)
            self.model, self._theirs = model, own
        else:
            self.model = spft.api.get_spft_model(model, config)
            self._theirs = [cls.forward for cls in self._classes]
        self._own = own
        self._swap(self._own)

    def _swap(self, forwards: list) -> None:
        for cls, forward in zip(self._classes, forwards):
            cls.forward = forward

    def active(self):
        """A context in which peft's LoRA layers run SparseLoRA's ``lora_forward`` (the HF path), as after
        ``get_spft_model`` in SparseLoRA's own process."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            self._swap(self._theirs)
            try:
                yield
            finally:
                self._swap(self._own)

        return scope()

    def sparse_modules(self) -> list:
        return [m for m in self.model.modules() if isinstance(m, self.spft.api.SparseModule)]

    def set_step(self, step: int, max_steps: int) -> bool:
        """SparseLoRA's callback at the start of optimizer step ``step`` (dense before ``start_step``); True when
        this step runs sparse."""
        from transformers import TrainerControl, TrainerState

        state = TrainerState(global_step=step, max_steps=max_steps)
        self.callback.on_step_begin(None, state, TrainerControl(), model=self.model)
        return any(m.enabled and m.sparsity > 0 for m in self.sparse_modules())

    def set_enabled(self, enabled: bool) -> None:
        for module in self.sparse_modules():
            module.enabled = enabled

    def token_split(self) -> tuple[int, int] | None:
        """(sparse, dense) tokens per row of the last sparse forward, from SparseLoRA's own module stats."""
        for module in self.sparse_modules():
            if "token_split/dense" in module.stats:
                return module.stats["token_split/sparse"], module.stats["token_split/dense"]
        return None


def sparsify(
    spft: types.SimpleNamespace,
    model: torch.nn.Module,
    *,
    shipped: dict,
    mlp_ratios: list[float],
    lora_targets: list[str],
    predictor_dir: Path,
    model_id: str,
    batch_size: int,
    max_length: int,
    padding_side: str,
) -> SparseLoRAModel:
    """Apply SparseLoRA to the peft ``model``: the shipped config's general settings (``start_step``, ``mode``,
    ``skip_output_tokens``...) with ``mlp_ratios`` per layer and attention dense (item 2), every other option at
    SparseLoRA's own default (``SPFTConfig.update`` from its argument dataclasses, as its entry point does)."""
    sparsity = {}
    for i, ratio in enumerate(mlp_ratios):
        sparsity[f"layers.{i}.mlp"] = ratio
        sparsity[f"layers.{i}.self_attn"] = 0
    config = spft.api.SPFTConfig(sparsity=sparsity, **{k: v for k, v in shipped.items() if k != "sparsity"})
    predictor_dir.mkdir(parents=True, exist_ok=True)
    training = spft.args.TrainingArguments(
        output_dir=str(predictor_dir),
        per_device_train_batch_size=batch_size,
        lora_target_modules=",".join(lora_targets),
        spft_predictor_basepath=str(predictor_dir),
        report_to="none",
        use_cpu=True,
    )
    parts = [
        spft.args.ModelArguments(model_name_or_path=model_id),
        spft.args.DataTrainingArguments(model_max_length=max_length),
        training,
    ]
    config.update(parts, prefix="spft_", cli_keys=set())
    config.padding_side = padding_side  # train/main.py:51 sets it from the tokenizer
    dtype = next(model.parameters()).dtype
    wrapped = SparseLoRAModel(spft, model, config, lora_on_mlp=any(t in MLP_PROJECTIONS for t in lora_targets))
    wrapped.model.to(dtype)  # item 5: train/main.py:56 casts the patched model (predictors included) to the run's dtype
    return wrapped
