"""Head options of the LoRAX family: WA, prototype initialisation, balanced fine-tuning, NCM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_cddb_tree
from lorax_cil.benchmarks.scenarios import resolve_scenario
from lorax_cil.models.heads import (
    blockwise_cosine_logits,
    build_expandable_net,
    cosine_logits,
    set_prototype_rows,
    weight_align,
)
from lorax_cil.training import head_balance
from lorax_cil.training.config import RunConfig, merge_config
from lorax_cil.training.head_balance import HeadBalancer, HeadOptions, feature_table
from lorax_cil.training.runner import Run


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_cddb_tree(tmp_path_factory.mktemp("data"), tasks=("a", "b"), n=6, size=(36, 36),
                          subclass_tasks=())


def tiny_run(data_root, out, **train) -> Run:
    t = {"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "memory_size": 8, "eval_batch_size": 16,
         "min_steps_per_task": 0, "lr": 1e-3, "lr_first": 1e-3}
    t.update(train)
    cfg = merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0},
        "data": {"scenario": "custom"},
        "train": t,
    }, source="test")
    run = Run(cfg, run_dir=out)
    run.setup(resolve_scenario("custom", data_path=data_root, tasks=["a", "b"]))
    return run


def train_recording_first_task_scores(data_root, out, monkeypatch, readout: str):
    """Train a 2-task run with ``readout`` and record, after each task's read-out update, the
    first task's class scores of 4 of its evaluation images: ``(run, {num_tasks: scores})``."""
    scores = {}
    original = HeadBalancer.after_task

    def spy(self, strategy):
        original(self, strategy)
        net = strategy.model.net.eval()
        x = torch.stack([run.bench.test_stream[0].dataset.eval()[i][0] for i in range(4)])
        with torch.no_grad():
            scores[net.num_tasks] = net.forward_all(x).logits[:, :2].clone()

    monkeypatch.setattr(HeadBalancer, "after_task", spy)
    run = tiny_run(data_root, out, readout=readout, memory_size=4)
    run.train()
    return run, scores


def test_weight_align_leaves_old_rows_and_equalises_mean_norms():
    torch.manual_seed(0)
    head = nn.Linear(8, 6)
    with torch.no_grad():
        head.weight[4:] *= 5.0
    old_w, old_b = head.weight[:4].clone(), head.bias[:4].clone()
    new_w, new_b = head.weight[4:].clone(), head.bias[4:].clone()
    gamma = weight_align(head, 4)
    assert torch.equal(head.weight[:4], old_w) and torch.equal(head.bias[:4], old_b)
    norms = head.weight.detach().norm(dim=1)
    assert torch.isclose(norms[4:].mean(), norms[:4].mean(), rtol=1e-5)
    assert gamma < 1 and torch.allclose(head.weight[4:], new_w * gamma)
    assert torch.allclose(head.bias[4:], new_b * gamma)
    assert weight_align(head, 0) == 1.0  # first task: nothing to align to


def test_prototype_rows_are_normalised_class_means_at_the_old_rows_norm():
    torch.manual_seed(0)
    head = nn.Linear(5, 4)
    old_w = head.weight[:2].detach().clone()
    means = torch.randn(2, 5) * 3
    scale = set_prototype_rows(head, [2, 3], means, num_old=2)
    assert torch.equal(head.weight[:2], old_w)
    assert scale == pytest.approx(float(old_w.norm(dim=1).mean()), rel=1e-6)
    expected = nn.functional.normalize(means, dim=1) * scale
    assert torch.allclose(head.weight[2:], expected, atol=1e-6)
    assert torch.allclose(head.bias[2:], head.bias[:2].mean().expand(2))


def test_cosine_readout_predicts_the_nearest_class_mean():
    protos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 3.0], [-1.0, 5.0, 0.1]])
    assert cosine_logits(x, protos).argmax(1).tolist() == [0, 2, 1]


def test_balanced_finetuning_changes_only_the_head(data_root, tmp_path, monkeypatch):
    seen = {}
    original = HeadBalancer.balanced_finetune

    def spy(self, net, *args, **kwargs):
        keep = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
        head = net.head.weight.detach().clone()
        original(self, net, *args, **kwargs)
        after = net.state_dict()
        seen["frozen"] = all(torch.equal(v, after[k]) for k, v in keep.items())
        seen["head_moved"] = not torch.equal(head, net.head.weight)
        seen["labels"] = sorted(set(args[1].tolist()) | set(args[3].tolist()))

    monkeypatch.setattr(HeadBalancer, "balanced_finetune", spy)
    run = tiny_run(data_root, tmp_path / "r", head_balanced_steps=5)
    run.train()
    assert seen == {"frozen": True, "head_moved": True, "labels": [0, 1, 2, 3]}


def test_prototype_init_sets_new_rows_before_training(data_root, tmp_path, monkeypatch):
    checked = []
    original = HeadBalancer.before_task

    def spy(self, strategy):
        original(self, strategy)
        net = strategy.model.net
        feats, labels = feature_table(net, strategy.experience.dataset, device="cpu")
        first = net.num_classes - 2
        rows = net.head.weight.detach()[first:]
        for j, c in enumerate(range(first, net.num_classes)):
            mean = feats[labels == c].mean(0)
            assert torch.allclose(nn.functional.normalize(rows[j], dim=0),
                                  nn.functional.normalize(mean, dim=0), atol=1e-5)
        checked.append(first)

    monkeypatch.setattr(HeadBalancer, "before_task", spy)
    tiny_run(data_root, tmp_path / "r", head_init="prototype").train()
    assert checked == [0, 2]


def test_ncm_readout_predicts_by_class_means_and_survives_a_checkpoint(data_root, tmp_path):
    from lorax_cil.training.evaluate import load_trained

    run = tiny_run(data_root, tmp_path / "r", readout="ncm", memory_size=4)
    run.train()
    net = run.net.eval()
    x = torch.stack([run.bench.test_stream[1].dataset.eval()[i][0] for i in range(4)])
    with torch.no_grad():
        out = net.forward_all(x)
    expected = cosine_logits(out.features, net.prototypes)
    assert torch.equal(out.logits.argmax(1), expected.argmax(1))
    # new classes' means are the means over the task's images
    feats, labels = feature_table(net, run.bench.train_stream[1].dataset, device="cpu")
    assert torch.allclose(net.prototypes[3], feats[labels == 3].mean(0), atol=1e-5)
    # old classes keep the block of the extractor that existed when they were learnt
    d = net.feature_dim
    feats0, labels0 = feature_table(net, run.bench.train_stream[0].dataset, device="cpu")
    assert torch.allclose(net.prototypes[0, :d], feats0[labels0 == 0, :d].mean(0), atol=1e-5)
    loaded, *_ = load_trained(run.run_dir)
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), net(x).argmax(1))
    assert torch.equal(loaded.prototypes, net.prototypes)


def test_blockwise_cosine_reads_each_class_on_its_own_blocks():
    torch.manual_seed(0)
    f, p = torch.randn(5, 6), torch.randn(3, 6)  # 3 blocks of 2
    n = torch.tensor([1, 2, 3])
    got = blockwise_cosine_logits(f, p, n, 3)
    fb = nn.functional.normalize(f.reshape(5, 3, 2), dim=2)
    pb = nn.functional.normalize(p.reshape(3, 3, 2), dim=2)
    for c in range(3):
        want = sum((fb[:, b] * pb[c, b]).sum(1) for b in range(n[c])) / n[c]
        assert torch.allclose(got[:, c], want, atol=1e-6)
    # blocks past a class's count are ignored, whatever they hold
    p2 = p.clone()
    p2[0, 2:] = 1e3
    assert torch.equal(blockwise_cosine_logits(f, p2, n, 3)[:, 0], got[:, 0])
    with pytest.raises(ValueError, match="1..3"):
        blockwise_cosine_logits(f, p, torch.tensor([0, 1, 1]), 3)


def test_ncm_frozen_keeps_old_class_scores_and_reads_no_exemplar(data_root, tmp_path, monkeypatch):
    from lorax_cil.training.evaluate import load_trained

    run, scores = train_recording_first_task_scores(data_root, tmp_path / "r", monkeypatch,
                                                    "ncm-frozen")
    net = run.net.eval()
    assert net.own_blocks and net.class_blocks().tolist() == [1, 1, 2, 2]
    # the first task's classes score every image exactly as they did when they were learnt
    assert torch.allclose(scores[1], scores[2], atol=1e-6)
    d = net.feature_dim
    feats0, labels0 = feature_table(net, run.bench.train_stream[0].dataset, device="cpu")
    assert torch.allclose(net.prototypes[0, :d], feats0[labels0 == 0, :d].mean(0), atol=1e-5)
    assert torch.equal(net.prototypes[:2, d:], torch.zeros(2, d))  # no exemplar mean
    loaded, *_ = load_trained(run.run_dir)
    x = torch.stack([run.bench.test_stream[1].dataset.eval()[i][0] for i in range(4)])
    with torch.no_grad():
        assert loaded.own_blocks and torch.equal(loaded(x), net(x))


def test_finished_runs_are_read_exactly_with_either_readout(data_root, tmp_path):
    """Re-reading a run's last checkpoint with ncm-frozen gives the matrices the run recorded
    while training with that read-out (old blocks never change), and re-reading the checkpoint
    of every task with the head gives those of a head-trained run; each run can be read the
    other way, a shared extractor or missing per-task checkpoints are refused."""
    import numpy as np

    from lorax_cil.training.evaluate import ncm_frozen_matrices, readout_matrices

    run = tiny_run(data_root, tmp_path / "ncmf", readout="ncm-frozen", memory_size=4)
    run.train()
    got = ncm_frozen_matrices(run.run_dir)
    assert got["task_names"] == ["a", "b"]
    for kind in ("multi_real", "binary", "strict"):
        np.testing.assert_allclose(got[kind], run.matrices[kind].matrix, atol=1e-12)
    # the same through the CLI, with its JSON (NaN above the diagonal written as null)
    import json

    from lorax_cil.cli import main
    assert main(["eval", "--run", str(run.run_dir), "--rescore", "ncm-frozen",
                 "--out", str(tmp_path / "r.json")]) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["multi_real"][0][1] is None
    np.testing.assert_allclose(np.array(written["multi_real"], dtype=float),
                               run.matrices["multi_real"].matrix, atol=1e-12)
    assert main(["eval", "--run", str(run.run_dir), "--rescore", "ncm-frozen",
                 "--tasks", "a"]) == 2
    head = tiny_run(data_root, tmp_path / "head", readout="head", memory_size=4)
    head.train()
    read = ncm_frozen_matrices(head.run_dir)
    assert np.isnan(read["multi_real"][0, 1]) and not np.isnan(read["multi_real"][1]).any()
    assert read["summary"]["multi_real"]["aa"] == pytest.approx(read["multi_real"][1].mean())
    # the head read-out, from the checkpoint of every task: exact on a head-trained run ...
    again = readout_matrices(head.run_dir, "head")
    for kind in ("multi_real", "binary", "strict"):
        np.testing.assert_allclose(again[kind], head.matrices[kind].matrix, atol=1e-12)
    # ... and available for a run trained with ncm-frozen (its last row: the final head)
    other = readout_matrices(run.run_dir, "head", recorded=False)
    from lorax_cil.training.runner import predict_dataset

    final = run.net.eval()
    final.readout = "head"
    for j in range(2):
        pred, _, y = predict_dataset(final, run.bench.test_stream[j].dataset, batch_size=16,
                                     device=torch.device("cpu"))
        assert float(np.mean(pred == y)) == pytest.approx(other["strict"][1, j], abs=1e-12)
    once = tiny_run(data_root, tmp_path / "once", readout="head", memory_size=4,
                    checkpoint_every_task=False)
    once.train()
    with pytest.raises(ValueError, match="missing exp_000"):
        readout_matrices(once.run_dir, "head")
    ft = tiny_run(data_root, tmp_path / "ft", strategy="finetune-replay", memory_size=4)
    ft.train()
    with pytest.raises(ValueError, match="needs one frozen feature block per task"):
        ncm_frozen_matrices(ft.run_dir)
    # --rescore all: the read-outs the run has, and why the others are missing
    assert main(["eval", "--run", str(ft.run_dir), "--rescore", "all",
                 "--out", str(tmp_path / "ft.json")]) == 0
    every = json.loads((tmp_path / "ft.json").read_text())["readouts"]
    assert "needs one frozen feature block per task" in every["ncm-relative"]["error"]
    np.testing.assert_allclose(np.array(every["head"]["multi_real"], dtype=float),
                               ft.matrices["multi_real"].matrix, atol=1e-12)


def test_rescoring_leaves_out_evaluation_files_that_fail_to_decode(tmp_path):
    """An evaluation image whose pixels do not decode is left out of every n while training;
    reading the run again gives the recorded matrices, so it is left out there too."""
    import numpy as np

    from lorax_cil.training.evaluate import readout_matrices

    root = make_cddb_tree(tmp_path / "d", tasks=("a", "b"), n=6, size=(36, 36),
                          subclass_tasks=())
    victim = root / "a" / "val" / "1_fake" / "000.png"
    victim.write_bytes(victim.read_bytes()[:60])  # header intact, pixels truncated
    run = tiny_run(root, tmp_path / "r", readout="ncm-frozen", memory_size=4)
    run.train()
    assert str(victim) in run.bench.issues.substituted_files
    for readout, want in (("ncm-frozen", run.matrices), ("head", run.head_matrices)):
        got = readout_matrices(run.run_dir, readout, recorded=False)
        for kind in ("multi_real", "binary", "strict"):
            np.testing.assert_allclose(got[kind], want[kind].matrix, atol=1e-12)


def test_class_mean_runs_record_the_linear_head_from_the_same_passes(data_root, tmp_path):
    """A run that reads by class means records the head's matrices too: equal to reading the
    checkpoint of every task with the head afterwards, written as CSV and in summary.json,
    carried through an interrupted and resumed run; a head-trained run records one set."""
    import json

    import numpy as np

    from lorax_cil.training.evaluate import readout_matrices
    from lorax_cil.training.runner import resume_run

    run = tiny_run(data_root, tmp_path / "ncmf", readout="ncm-frozen", memory_size=4)
    summary = run.train()
    after = readout_matrices(run.run_dir, "head", recorded=False)  # from every task's checkpoint
    assert after["source"] == "checkpoints"
    assert readout_matrices(run.run_dir, "head")["source"] == "recorded"
    for kind in ("multi_real", "binary", "strict"):
        np.testing.assert_allclose(run.head_matrices[kind].matrix, after[kind], atol=1e-12)
    # the two read-outs are different numbers on this run, not one matrix written twice
    assert not np.allclose(run.head_matrices["ap"].matrix[1], run.matrices["ap"].matrix[1])
    assert summary["readout"] == "ncm-frozen"
    assert summary["head_readout"]["multi_real_aa"] == pytest.approx(
        after["summary"]["multi_real"]["aa"], abs=1e-12)
    assert summary["head_readout"]["multi_real_bwt"] == pytest.approx(
        after["summary"]["multi_real"]["bwt"], abs=1e-12)
    written = json.loads((run.run_dir / "summary.json").read_text())
    assert written["head_readout"] == summary["head_readout"]
    from lorax_cil.evaluation.metrics import AccuracyMatrix

    csv = AccuracyMatrix.from_csv(run.run_dir / "accuracy_multi_real-head.csv").matrix
    np.testing.assert_allclose(csv, after["multi_real"], atol=1e-12)
    assert (run.run_dir / "ap-head.csv").is_file()
    # eval --readout head: the final model read with its head gives the recorded last row
    from lorax_cil.cli import main
    from lorax_cil.models.heads import READOUT_KINDS
    from lorax_cil.training.config import READOUTS
    from lorax_cil.training.evaluate import evaluate_run

    assert READOUT_KINDS == READOUTS
    got = evaluate_run(run.run_dir, readout="head")
    assert got["readout"] == "head" and evaluate_run(run.run_dir)["readout"] == "ncm-frozen"
    for i, name in enumerate(["a", "b"]):
        assert got["per_task"][name]["multi_real"] == pytest.approx(
            run.head_matrices["multi_real"].matrix[1, i], abs=1e-12)
    assert main(["eval", "--run", str(run.run_dir), "--readout", "ncm"]) == 2
    assert main(["eval", "--run", str(run.run_dir), "--rescore", "head", "--readout", "head"]) == 2
    # interrupted after the first task and resumed: the same head matrices
    part = tiny_run(data_root, tmp_path / "part", readout="ncm-frozen", memory_size=4)
    part.train(stop_after=1)
    resumed = resume_run(tmp_path / "part")
    resumed.train()
    for kind in ("multi_real", "binary", "strict", "ap"):
        np.testing.assert_allclose(resumed.head_matrices[kind].matrix,
                                   run.head_matrices[kind].matrix, atol=1e-12)
    # a checkpoint without them (written before they were recorded): the resumed run says so
    # and records only its own read-out, rather than a head matrix with missing rows
    old = tiny_run(data_root, tmp_path / "old", readout="ncm-frozen", memory_size=4)
    old.head_matrices = None
    old.train(stop_after=1)
    said = []
    later = resume_run(tmp_path / "old", progress=said.append)
    assert later.head_matrices is None and any("no linear-head matrices" in m for m in said)
    assert "head_readout" not in later.train()
    # without the checkpoint of every task the recorded matrices still answer
    once = tiny_run(data_root, tmp_path / "once", readout="ncm-frozen", memory_size=4,
                    checkpoint_every_task=False)
    once.train()
    got = readout_matrices(once.run_dir, "head")
    np.testing.assert_allclose(got["multi_real"], run.head_matrices["multi_real"].matrix,
                               atol=1e-12)
    with pytest.raises(ValueError, match="missing exp_000"):
        readout_matrices(once.run_dir, "head", recorded=False)
    head = tiny_run(data_root, tmp_path / "head", readout="head", memory_size=4)
    assert head.train().get("head_readout") is None and head.head_matrices is None
    # a baseline with a classification rule of its own has no read-out to choose
    proto = tiny_run(data_root, tmp_path / "simplecil", strategy="simplecil")
    proto.train()
    assert evaluate_run(proto.run_dir)["readout"] is None
    with pytest.raises(ValueError, match="does not apply"):
        evaluate_run(proto.run_dir, readout="head")
    for readout in ("head", "ncm-frozen", "ncm-relative", "all"):  # a message, no AttributeError
        assert main(["eval", "--run", str(proto.run_dir), "--rescore", readout]) == 2
    assert not (head.run_dir / "accuracy_multi_real-head.csv").exists()


@pytest.mark.parametrize("kind", ["full", "class-attention", "finetune"])
def test_ncm_update_keeps_old_blocks_exactly_when_old_extractors_are_frozen(kind):
    from lorax_cil.models.backbones import create_backbone

    torch.manual_seed(0)
    net = build_expandable_net("ncm", backbone=create_backbone("vit-test", pretrained=False),
                               extractor=kind, adapt_blocks=1)
    net.add_task(2)
    d = net.feature_dim
    first = torch.randn(2, d)
    net.set_prototypes(first)
    net.add_task(2)
    F = net.num_features
    new_feats, new_labels = torch.randn(6, F), torch.tensor([2, 2, 2, 3, 3, 3])
    mem_feats, mem_labels = torch.randn(4, F), torch.tensor([0, 0, 1, 1])
    HeadBalancer(HeadOptions(readout="ncm")).update_prototypes(
        net, new_feats, new_labels, mem_feats, mem_labels, 2)
    mem_means = torch.stack([mem_feats[:2].mean(0), mem_feats[2:].mean(0)])
    if kind == "finetune":  # one shared block that keeps training: means from the exemplars
        assert torch.allclose(net.prototypes[:2], mem_means, atol=1e-6)
    else:  # old blocks kept, the new block from the exemplars
        assert torch.equal(net.prototypes[:2, :d], first)
        assert torch.allclose(net.prototypes[:2, d:], mem_means[:, d:], atol=1e-6)
    assert torch.allclose(net.prototypes[3], new_feats[3:].mean(0), atol=1e-6)


def test_ncm_frozen_needs_an_extractor_that_grows():
    from lorax_cil.models.backbones import create_backbone

    backbone = create_backbone("vit-test", pretrained=False)
    with pytest.raises(ValueError, match="ncm-frozen read-out needs one feature block per task"):
        build_expandable_net("ncm-frozen", backbone=backbone, extractor="finetune")
    with pytest.raises(ValueError, match="ncm-relative read-out needs one feature block per task"):
        build_expandable_net("ncm-relative", backbone=backbone, extractor="finetune")
    with pytest.raises(ValueError, match="train.readout must be"):
        build_expandable_net("knn", backbone=backbone, extractor="lora")


def test_head_options_are_refused_where_they_would_be_ignored(data_root, tmp_path):
    with pytest.raises(ValueError, match="does not use train.head_init"):
        tiny_run(data_root, tmp_path / "r", strategy="simplecil", head_wa=True)


@pytest.mark.parametrize("kw", [{"init": "zeros"}, {"readout": "knn"}, {"balanced_steps": -1}])
def test_bad_head_options_raise(kw):
    with pytest.raises(ValueError):
        HeadOptions(**kw)


def test_official_defaults_do_nothing(monkeypatch):
    assert HeadOptions.from_config(RunConfig().train) == HeadOptions()
    called = []
    monkeypatch.setattr(head_balance, "feature_table", lambda *a, **k: called.append(1))

    class S:  # after_task must return before touching the strategy
        pass

    HeadBalancer(HeadOptions()).before_task(S())
    HeadBalancer(HeadOptions()).after_task(type("T", (), {"model": type("M", (), {"net": None})})())
    assert called == []


def test_lorax_family_defaults_to_the_ncm_frozen_readout_on_a_cnn_and_explicit_head_wins():
    from lorax_cil.training.registry import apply_preset

    def resolved(strategy, explicit=None, **train):
        cfg = merge_config(RunConfig(), {"train": {"strategy": strategy, **train}}, source="t")
        return apply_preset(cfg, explicit).train.readout

    assert RunConfig().model.backbone == "efficientnet-lite0"
    assert [resolved(s) for s in ("lorax", "lorax-deep", "lorax-side", "lorax-mole")] == ["ncm-frozen"] * 4
    vit = merge_config(RunConfig(), {"model": {"backbone": "dinov2-vits14"},
                                     "train": {"strategy": "lorax-deep"}}, source="t")
    assert (apply_preset(vit).train.readout, apply_preset(vit).train.head_balanced_steps) == \
        ("head", 100)
    assert resolved("lorax-ca") is None  # its own network keeps the linear head
    assert resolved("lorax", {"train.readout": "--set train.readout=head"}, readout="head") == "head"
    assert resolved("lorax", None, readout="head") == "head"  # a value given in a file or dict
    assert resolved("finetune-replay") is None and HeadOptions.from_config(
        merge_config(RunConfig(), {"train": {"strategy": "finetune-replay"}}, source="t").train
    ).readout == "head"


def test_saved_configs_without_the_new_keys_keep_their_old_behaviour():
    from lorax_cil.training.config import saved_run_config
    from lorax_cil.training.registry import apply_preset

    old = {"train": {"strategy": "lorax", "epochs": 3}}
    cfg = apply_preset(saved_run_config(old, source="meta.json"))
    assert cfg.train.readout == "head" and cfg.train.min_steps_per_task == 0
    assert cfg.train.head_balanced_steps == 0
    old_vit = {"model": {"backbone": "dinov2-vits14"}, "train": {"strategy": "lorax"}}
    cfg = apply_preset(saved_run_config(old_vit, source="meta.json"))  # the official head, as run
    assert (cfg.train.readout, cfg.train.head_balanced_steps) == ("head", 0)
    new = {"train": {"strategy": "lorax", "readout": "ncm", "min_steps_per_task": 200}}
    cfg = apply_preset(saved_run_config(new, source="meta.json"))
    assert cfg.train.readout == "ncm" and cfg.train.min_steps_per_task == 200


def test_balanced_class_weights_give_every_present_class_the_same_total_weight():
    from lorax_cil.training.strategy import balanced_class_weights

    targets = [0, 0, 1, 2, 2, 2, 2, 2, 2, 4]  # class 3 absent
    w = balanced_class_weights(targets, 5)
    counts = torch.bincount(torch.tensor(targets), minlength=5).float()
    totals = w * counts
    assert w[3] == 0 and torch.allclose(totals[[0, 1, 2, 4]], torch.full((4,), 2.5))
    assert torch.isclose((w[torch.tensor(targets)]).mean(), torch.tensor(1.0))


def test_balanced_loss_weights_the_training_loss_by_class(data_root, tmp_path, monkeypatch):
    """Task 2 trains on 6 images per new class and 2 exemplars per old class (memory 4): the
    loss of each training batch is the class-weighted cross-entropy (plus the divergence
    loss), which differs from the unweighted one."""
    from lorax_cil.training.strategy import LoRAX

    seen = []
    original = LoRAX.criterion

    def spy(self):
        loss = original(self)
        if self.is_training and self.net.num_tasks == 2:
            w = self.class_weights
            expected = nn.functional.cross_entropy(self.mb_output, self.mb_y, weight=w)
            unweighted = nn.functional.cross_entropy(self.mb_output, self.mb_y)
            seen.append((torch.allclose(loss, expected + self.head_div * nn.functional.cross_entropy(
                self.mb_div_logits, self.net.divergence_targets(self.mb_y))),
                bool(torch.isclose(expected, unweighted))))
        return loss

    monkeypatch.setattr(LoRAX, "criterion", spy)
    run = tiny_run(data_root, tmp_path / "r", head_balanced_loss=True, memory_size=4)
    run.train()
    w = run.strategy.class_weights
    # old classes weigh 3x more
    assert torch.allclose(w[:2] / w[2:], torch.full((2,), 3.0))
    assert seen and all(ok for ok, _ in seen) and not all(same for _, same in seen)


def test_balanced_loss_is_refused_where_it_would_be_ignored(data_root, tmp_path):
    with pytest.raises(ValueError, match="train.head_balanced_loss"):
        tiny_run(data_root, tmp_path / "r", strategy="simplecil", head_balanced_loss=True)


def test_block_offset_is_the_leave_one_out_cosine_to_the_tasks_mean():
    from lorax_cil.models.heads import block_offset

    torch.manual_seed(0)
    x = torch.randn(7, 5) + 2.0
    want = [float(nn.functional.cosine_similarity(
        x[i], x[[j for j in range(7) if j != i]].mean(0), dim=0)) for i in range(7)]
    assert block_offset(x) == pytest.approx(sum(want) / 7, abs=1e-6)
    # in-sample, an image would score a mean it is part of: higher
    insample = nn.functional.cosine_similarity(x, x.mean(0, keepdim=True), dim=1).mean()
    assert float(insample) > block_offset(x)
    # a block that makes the images alike has a higher baseline than one that spreads them
    assert block_offset(x * torch.tensor([1, 1, 1, 1, 0.01])) > block_offset(x - 2.0)
    with pytest.raises(ValueError, match="two or more training images"):
        block_offset(x[:1])


def test_blockwise_cosine_subtracts_each_blocks_offset():
    torch.manual_seed(1)
    f, p = torch.randn(4, 6), torch.randn(3, 6)  # 3 blocks of 2
    n, off = torch.tensor([1, 2, 3]), torch.tensor([0.5, -0.25, 0.125])
    plain = blockwise_cosine_logits(f, p, n, 3)
    got = blockwise_cosine_logits(f, p, n, 3, offsets=off)
    for c in range(3):
        assert torch.allclose(got[:, c], plain[:, c] - off[: n[c]].mean(), atol=1e-6)
    with pytest.raises(ValueError, match="offsets must be"):
        blockwise_cosine_logits(f, p, n, 3, offsets=off[:2])


def test_ncm_relative_is_frozen_exact_on_rescore_and_reads_as_ncm_frozen(data_root, tmp_path,
                                                                          monkeypatch):
    """The ncm-relative read-out: one offset per task, from that task's images in its own
    block; old classes keep their scores; the checkpoint holds the offsets; re-reading the
    run gives its recorded matrices; the same network reads ncm-frozen without them."""
    import numpy as np

    from lorax_cil.models.heads import OFFSETS_KEY, block_offset, current_readout, use_readout
    from lorax_cil.training.evaluate import evaluate_run, load_trained, ncm_frozen_matrices

    run, scores = train_recording_first_task_scores(data_root, tmp_path / "r", monkeypatch,
                                                    "ncm-relative")
    net = run.net.eval()
    assert net.relative and current_readout(net) == "ncm-relative"
    assert torch.allclose(scores[1], scores[2], atol=1e-6)  # old classes: frozen scores
    d = net.feature_dim
    for t in range(2):
        feats, _ = feature_table(net, run.bench.train_stream[t].dataset, device="cpu")
        assert float(net.block_offsets[t]) == pytest.approx(
            block_offset(feats[:, t * d:(t + 1) * d]), abs=1e-5)
    assert OFFSETS_KEY in net.learned_state_dict()
    got = ncm_frozen_matrices(run.run_dir, relative=True)
    for kind in ("multi_real", "binary", "strict"):
        np.testing.assert_allclose(got[kind], run.matrices[kind].matrix, atol=1e-12)
    import json

    from lorax_cil.cli import main
    assert main(["eval", "--run", str(run.run_dir), "--rescore", "ncm-relative",
                 "--out", str(tmp_path / "rel.json")]) == 0
    written = json.loads((tmp_path / "rel.json").read_text())
    np.testing.assert_allclose(np.array(written["multi_real"], dtype=float),
                               run.matrices["multi_real"].matrix, atol=1e-12)
    # the offsets change the logits (a run without them is another read-out)
    loaded, *_ = load_trained(run.run_dir)
    x = torch.stack([run.bench.test_stream[1].dataset.eval()[i][0] for i in range(4)])
    with torch.no_grad():
        rel = loaded(x)
        use_readout(loaded, "ncm-frozen")
        assert current_readout(loaded) == "ncm-frozen" and not torch.allclose(loaded(x), rel)
        use_readout(loaded, "ncm-relative")
        assert torch.equal(loaded(x), rel)
    frozen = ncm_frozen_matrices(run.run_dir)
    assert main(["eval", "--run", str(run.run_dir), "--rescore", "all",
                 "--out", str(tmp_path / "all.json")]) == 0
    every = json.loads((tmp_path / "all.json").read_text())
    assert every["own_readout"] == "ncm-relative"
    for readout, want in (("ncm-relative", run.matrices["multi_real"].matrix),
                          ("ncm-frozen", frozen["multi_real"]),
                          ("head", run.head_matrices["multi_real"].matrix)):
        np.testing.assert_allclose(np.array(every["readouts"][readout]["multi_real"], dtype=float),
                                   want, atol=1e-12)
    read = evaluate_run(run.run_dir, readout="ncm-frozen")
    assert read["readout"] == "ncm-frozen"
    for i, name in enumerate(["a", "b"]):
        assert read["per_task"][name]["multi_real"] == pytest.approx(frozen["multi_real"][1, i],
                                                                     abs=1e-12)
    # a network that holds ncm-frozen means has no offsets to read with
    from lorax_cil.models.backbones import create_backbone

    plain = build_expandable_net("ncm-frozen", backbone=create_backbone("vit-test", pretrained=False),
                                 extractor="full", adapt_blocks=1)
    with pytest.raises(ValueError, match="not in this checkpoint"):
        use_readout(plain, "ncm-relative")
    sd = {k: v for k, v in loaded.learned_state_dict().items() if k != OFFSETS_KEY}
    with pytest.raises(ValueError, match="block_offsets"):
        loaded.load_learned_state_dict(sd)
