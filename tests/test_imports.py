"""The engine's public API imports and runs without the packages only sat-train needs (the cli extra),
and sat-train says in one line how to install them."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_ONLY = ("datasets", "matplotlib", "chatterbot", "chatterbot_corpus", "gguf")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_engine_imports_and_patches_without_the_app_packages():
    """A finder first on sys.meta_path refuses (and records) every import of an app-only package: the public
    names resolve, a tiny Llama built from a config is patched and trains a sparse step, and none was asked for."""
    result = _run(f"""
        import sys
        BLOCKED = {APP_ONLY!r}
        asked = []

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    asked.append(name)
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Refuse())
        import torch, transformers
        import sat_trainer
        from sat_trainer import SATCallback, SATConfig, apply_sat

        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(config)
        handle = apply_sat(model, SATConfig(omission_rate=0.5, targets=["mlp", "attention"]))
        SATCallback({{"omission_rate": 0.5}})
        model.train()
        handle.set_rate(0.5)
        handle.new_step()
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(handle.units) == 4 and handle.kept_flops_fraction() < 1
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("asked", asked, "loaded", loaded)
        assert not asked and not loaded
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sat_train_names_the_cli_extra_when_its_packages_are_missing():
    result = _run("""
        import sys
        sys.modules["matplotlib"] = None  # as if not installed: import fails, find_spec answers None
        from sat_trainer.app.cli import main
        sys.exit(main(["cpt", "--config", "configs/demo_cpt.yaml"]))
    """)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines == ['sat-train: error: matplotlib not installed; sat-train needs: pip install "sat_trainer[cli]"'], (
        result.stderr[-3000:]
    )
