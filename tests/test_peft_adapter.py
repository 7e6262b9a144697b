"""peft interop: an exported task adapter loads with peft and gives the toolkit's features; a peft
adapter becomes the extractor of an added task; extractors peft cannot express are refused."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_cddb_tree
from lorax_cil.cli import main

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=("a", "b", "c"), n=4,
                          size=(32, 32), subclass_tasks=())


def train(data_root, out, strategy, *extra, tasks=("a", "b")):
    assert main(["train", "-q", "--strategy", strategy, "--scenario", "custom", "--data-path",
                 str(data_root), "--tasks", *tasks, "--backbone", "vit-test", "--no-pretrained",
                 "--epochs", "1", "--batch-size", "8", "--memory-size", "4", "--set",
                 "train.warmup_epochs=0", "--set", "train.min_steps_per_task=0", "--set",
                 "model.lora_r=4", "--set", "model.lora_alpha=8", "--lr", "1e-2", "--lr-first",
                 "1e-2", "--out", str(out), *extra]) == 0


def toolkit_features(run, task, x):
    from lorax_cil.training.evaluate import load_trained

    net = load_trained(run)[0].eval()
    with torch.no_grad():
        feats = net.forward_all(x).features
    d = net.feature_dim
    return feats[:, task * d:(task + 1) * d]


def peft_features(run, folder, x):
    from peft import PeftModel

    from lorax_cil.training.config import RunConfig
    from lorax_cil.training.runner import build_backbone

    cfg = RunConfig.from_dict(json.loads(json.dumps(
        __import__("yaml").safe_load((run / "config.yaml").read_text()))), source="run")
    base = build_backbone(cfg).model  # the same timm model, same weights, no toolkit adapters
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        m = model.base_model.model
        return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("strategy,blocks", [("lorax", 4), ("lorax-deep", 2)])
def test_exported_adapter_loads_in_peft_with_the_toolkit_features(data_root, tmp_path, strategy,
                                                                  blocks, capsys):
    run = tmp_path / "run"
    extra = ["--adapt-blocks", "2"] if strategy == "lorax-deep" else []
    train(data_root, run, strategy, *extra)
    out = tmp_path / "adapter-b"
    assert main(["export-adapter", str(run), "--task", "b", "--out", str(out)]) == 0
    assert "peft LoRA adapter (r=4" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    adapted = {m.split(".")[1] for m in config["target_modules"]}
    assert adapted == {str(i) for i in range(4 - blocks, 4)}  # only the adapted blocks
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mine, theirs = toolkit_features(run, 1, x), peft_features(run, out, x)
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    # and the adapter is not a no-op: task a's adapter gives other features
    assert not torch.allclose(toolkit_features(run, 0, x), mine, atol=1e-4)


def test_peft_adapter_starts_an_added_task(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train(data_root, run, "lorax-deep", "--adapt-blocks", "2")
    folder = tmp_path / "adapter-b"
    assert main(["export-adapter", str(run), "--task", "b", "--out", str(folder)]) == 0
    # a peft adapter saved with another alpha is rescaled to the run's scaling
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 16
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    weights = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v / 2 if ".lora_B." in k else v for k, v in weights.items()},
              str(folder / "adapter_model.safetensors"))
    assert main(["train", "-q", "--resume", str(run), "--add-task", f"c={data_root / 'c'}",
                 "--adapter", str(folder), "--lr", "1e-12", "--lr-first", "1e-12",
                 "--allow-protocol-change"]) == 0
    from lorax_cil.training.evaluate import load_trained

    net = load_trained(run)[0]
    b, c = net.extractor_state_dict(1), net.extractor_state_dict(2)
    for k in b:  # lr 1e-12: task c's extractor is still the adapter it started from
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-6)
    step = json.loads((run / "steps.jsonl").read_text().splitlines()[-1])
    assert step["task"] == "c" and step["initial_adapter"] == str(folder)


def test_mismatched_or_inexpressible_adapters_are_refused(data_root, tmp_path, capsys):
    from lorax_cil.models.peft_adapter import peft_unsupported_reason

    assert "router" in peft_unsupported_reason("mole")
    ft = tmp_path / "ft"
    train(data_root, ft, "finetune", "--memory-size", "0", tasks=("a",))
    assert main(["export-adapter", str(ft), "--task", "a", "--out", str(tmp_path / "x")]) == 2
    assert "'finetune' extractor is the fine-tuned blocks themselves" in capsys.readouterr().err

    run = tmp_path / "run"
    train(data_root, run, "lorax-deep", "--adapt-blocks", "2", tasks=("a",))
    other = tmp_path / "other"
    train(data_root, other, "lorax-deep", "--adapt-blocks", "1", tasks=("a",))
    folder = tmp_path / "adapter-other"
    assert main(["export-adapter", str(other), "--task", "a", "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["train", "-q", "--resume", str(run), "--add-task", f"c={data_root / 'c'}",
                 "--adapter", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "the adapter's modules differ from the run's LoRA targets" in err
    assert main(["train", "-q", "--adapter", str(folder), "--out", str(tmp_path / "y")]) == 2
    assert "--adapter needs --resume" in capsys.readouterr().err
