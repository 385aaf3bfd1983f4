"""Branch-Train-MiX fixture build on a tiny random Llama: exact dense equivalence, the build path, loading."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/btx.py
from helpers import byte_tokenizer, tiny_model
from btx import BuildSettings, TrainSettings, Trunk, assemble, build, fit_router, mlp_weights, paragraphs


def _text(seed: int = 0) -> str:
    """Paragraphs from two disjoint alphabets: two obvious domains."""
    rng = random.Random(seed)
    blocks = []
    for i in range(40):
        letters = "abcdefgh" if i % 2 else "stuvwxyz"
        blocks.append(" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(60)))
    return "\n\n".join(blocks)


def test_identical_experts_reproduce_the_dense_model():
    dense = tiny_model("llama", num_hidden_layers=3)
    layers = [1, 2]
    experts = {i: [mlp_weights(dense.model.layers[i].mlp)] * 4 for i in layers}
    routers = {i: torch.randn(4, dense.config.hidden_size) for i in layers}
    moe = assemble(dense, experts, routers, top_k=2)
    ids = torch.randint(3, 250, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert moe.config.mlp_only_layers == [0]


def test_dense_equivalence_error_is_round_off():
    from btx import dense_equivalence_error

    dense = tiny_model("llama", num_hidden_layers=3)
    assert dense_equivalence_error(dense, [0, 2], 4, 2, torch.randint(3, 250, (1, 20))) < 1e-4


def test_trunk_suffix_equals_the_full_forward():
    dense = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 250, (2, 16))
    trunk = Trunk(dense, 1)
    with torch.no_grad():
        torch.testing.assert_close(trunk.suffix(trunk.prefix(ids)), dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_router_fit_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(3).repeat_interleave(50)
    x = centers[y] + torch.randn(150, 8, generator=g)
    weight = fit_router(x, y, 3)
    assert float(((x @ weight.T).argmax(1) == y).float().mean()) > 0.9


def test_paragraphs_join_short_blocks():
    parts = paragraphs("= Title =\n\n" + "x" * 250 + "\n \n" + "y" * 300, min_chars=200)
    assert parts == ["= Title =\n\n" + "x" * 250, "y" * 300]


def test_build_on_a_tiny_llama_gives_a_loadable_moe_with_distinct_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny_model("llama", num_hidden_layers=3)
    tokenizer = byte_tokenizer()
    settings = BuildSettings(experts=2, top_k=2, moe_layers=(1, 2), seq_len=32, windows_per_domain=8,
                             router_windows=4, train=TrainSettings(steps=4, batch=2, lr=1e-2))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe, info = build(dense, tokenizer, _text(), settings)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())      # dense left unchanged
    assert info["moe_layers"] == [1, 2] and len(info["domains_windows"]) == 2
    for layer in ("1", "2"):
        diff = info["expert_differences"][int(layer)]
        assert diff["pairwise_rel_frobenius_mean"] > 1e-3 and diff["to_dense_rel_frobenius_mean"] > 1e-3
    assert min(info["router_top1_domain_accuracy"].values()) > 0.6      # the two alphabets are told apart
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 250, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits)
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"


def test_assemble_refuses_unequal_expert_counts():
    dense = tiny_model("llama", num_hidden_layers=3)
    w = mlp_weights(dense.model.layers[1].mlp)
    with pytest.raises(ValueError, match="same expert count"):
        assemble(dense, {1: [w] * 2, 2: [w] * 3}, {1: torch.zeros(2, 64), 2: torch.zeros(3, 64)}, top_k=2)


def _splits(tokenizer, seq_len=32):
    from btx_domains import split_domain

    rng = random.Random(1)
    docs = {name: [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(40))
                   for _ in range(12)] for name, letters in (("ab", "abcdefgh"), ("st", "stuvwxyz"))}
    return [split_domain(name, d, tokenizer, seq_len, train=6, router_fit=3, router_test=2, held_out=2, seed=0)
            for name, d in docs.items()]


def test_domain_splits_are_disjoint_windows_of_the_domain():
    for split in _splits(byte_tokenizer()):
        rows = [tuple(r.tolist()) for part in (split.train, split.router_fit, split.router_test, split.held_out)
                for r in part]
        assert len(rows) == len(set(rows)) == 6 + 3 + 2 + 2
    from btx_domains import split_domain

    with pytest.raises(ValueError, match="nothing left to train on"):
        split_domain("tiny", ["abc"], byte_tokenizer(), 32, 4, 1, 1, 1, 0)


def test_build_from_domains_reports_out_of_sample_accuracy_and_resumes_from_checkpoints(tmp_path, monkeypatch):
    import btx
    from btx import build_from_domains, held_out_loss

    dense = tiny_model("llama", num_hidden_layers=3)
    splits = _splits(byte_tokenizer())
    settings = BuildSettings(experts=2, top_k=2, moe_layers=(1, 2), seq_len=32,
                             train=TrainSettings(steps=3, batch=2, lr=1e-2))
    moe, info = build_from_domains(dense, splits, settings, checkpoints=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert-0-ab.pt", "expert-1-st.pt"]
    assert set(info["router_top1_domain_accuracy_out_of_sample"]) == {1, 2}
    assert min(info["router_top1_domain_accuracy_out_of_sample"].values()) > 0.6   # two alphabets, unseen windows
    assert info["windows"]["ab"] == {"train": 6, "router_fit": 3, "router_test": 2, "held_out": 2}

    def no_training(*args, **kwargs):
        raise AssertionError("a checkpointed expert was trained again")

    monkeypatch.setattr(btx, "train_expert", no_training)
    again, _ = build_from_domains(dense, splits, settings, checkpoints=tmp_path)
    for a, b in zip(again.state_dict().values(), moe.state_dict().values()):
        assert torch.equal(a, b)
    loss = held_out_loss(btx.Trunk(moe, 1), splits[0].held_out)
    assert 0 < loss < 20


def test_pilot_snapshots_the_expert_at_the_asked_steps_and_leaves_the_model_dense():
    from btx_pilot import train_with_snapshots

    dense = tiny_model("llama", num_hidden_layers=3)
    before = mlp_weights(dense.model.layers[2].mlp)
    split = _splits(byte_tokenizer())[0]
    result = train_with_snapshots(Trunk(dense, 2), [2], split, TrainSettings(steps=4, batch=2, lr=1e-2), [2, 4])
    assert sorted(result["snapshots"]) == [2, 4] and len(result["losses"]) == 4
    moved = [float((result["snapshots"][s]["weights"][2][0] - before[0]).norm()) for s in (2, 4)]
    assert 0 < moved[0] < moved[1]
    assert all(torch.equal(a, b) for a, b in zip(before, mlp_weights(dense.model.layers[2].mlp)))


def test_build_pauses_between_experts_and_resumes_with_the_prefix_cached(tmp_path):
    from btx import BuildPaused, build_from_domains

    dense = tiny_model("llama", num_hidden_layers=3)
    splits = _splits(byte_tokenizer())
    settings = BuildSettings(experts=2, top_k=2, moe_layers=(1, 2), seq_len=32,
                             train=TrainSettings(steps=4, batch=2, lr=1e-2, schedule="cosine", warmup=1,
                                                 draw="epochs", loss_positions=8))
    with pytest.raises(BuildPaused, match="before domain 1"):
        build_from_domains(dense, splits, settings, checkpoints=tmp_path / "experts", max_new_experts=1,
                           prefix_cache=tmp_path / "prefix")
    assert [p.name for p in (tmp_path / "experts").iterdir()] == ["expert-0-ab.pt"]
    assert len(list((tmp_path / "prefix").iterdir())) == 1
    _, info = build_from_domains(dense, splits, settings, checkpoints=tmp_path / "experts", max_new_experts=1,
                                 prefix_cache=tmp_path / "prefix")
    assert len(list((tmp_path / "prefix").iterdir())) == 2
    assert set(info["expert_own_held_out_loss"]) == {"ab", "st"}
    assert all(0 < v < 20 for v in info["expert_own_held_out_loss"].values())


def test_cosine_schedule_warms_up_linearly_and_decays_to_zero():
    from btx import learning_rate_factor

    settings = TrainSettings(steps=11, schedule="cosine", warmup=3)
    factors = [learning_rate_factor(s, settings) for s in range(11)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(factors[3:], factors[4:])) and factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert learning_rate_factor(7, TrainSettings(steps=11)) == 1.0
    with pytest.raises(ValueError, match="warm-up needs"):
        TrainSettings(steps=11, warmup=2)


def test_epoch_draws_see_every_window_once_per_pass():
    from btx import window_draws

    draws = window_draws(5, TrainSettings(steps=6, batch=2, draw="epochs"), torch.Generator().manual_seed(0))
    flat = draws.flatten().tolist()
    assert draws.shape == (6, 2) and sorted(flat[:5]) == sorted(flat[5:10]) == [0, 1, 2, 3, 4]


def test_loss_on_random_positions_is_an_unbiased_estimate_of_the_full_loss():
    from btx import next_token_loss

    dense = tiny_model("llama", num_hidden_layers=2)
    trunk = Trunk(dense, 1)
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = trunk.prefix(ids)
        full = float(dense(input_ids=ids, labels=ids).loss)
        g = torch.Generator().manual_seed(1)
        assert float(next_token_loss(trunk, hidden, ids, 0, g)) == pytest.approx(full, rel=1e-5)
        assert float(next_token_loss(trunk, hidden, ids, 16, g)) == pytest.approx(full, rel=1e-5)   # all 16
        samples = [float(next_token_loss(trunk, hidden, ids, 2, g)) for _ in range(400)]
    assert sum(samples) / len(samples) == pytest.approx(full, rel=0.03)
    assert max(samples) - min(samples) > 0.03 * full        # the subsets do differ


def test_per_domain_rate_retrains_only_the_named_domain_at_its_rate(tmp_path, monkeypatch):
    import btx
    from btx import build_from_domains

    dense = tiny_model("llama", num_hidden_layers=3)
    splits = _splits(byte_tokenizer())
    base = BuildSettings(experts=2, top_k=2, moe_layers=(1, 2), seq_len=32,
                         train=TrainSettings(steps=4, batch=2, lr=1e-2, schedule="cosine", warmup=1))
    build_from_domains(dense, splits, base, checkpoints=tmp_path)
    first = {p.name: torch.load(p) for p in tmp_path.iterdir()}
    rates = []
    real = btx.train_expert

    def recording(trunk, layers, hidden, targets, settings, on_step=None):
        rates.append((settings.lr, settings.seed))
        return real(trunk, layers, hidden, targets, settings, on_step)

    monkeypatch.setattr(btx, "train_expert", recording)
    slow = BuildSettings(**{**vars(base), "domain_lr": {"st": 1e-4}})
    _, info = build_from_domains(dense, splits, slow, checkpoints=tmp_path)
    assert rates == [(1e-4, 1)]                       # "ab" reused as trained before; "st" at its rate, same seed
    assert info["expert_lr"] == {"ab": 1e-2, "st": 1e-4}
    second = {p.name: torch.load(p) for p in tmp_path.iterdir()}
    assert torch.equal(second["expert-0-ab.pt"]["trained"][2][0], first["expert-0-ab.pt"]["trained"][2][0])
    dense_gate = mlp_weights(dense.model.layers[2].mlp)[0]

    def moved(saved):
        return float((saved["expert-1-st.pt"]["trained"][2][0] - dense_gate).norm())

    assert 0 < moved(second) < 0.1 * moved(first)      # AdamW steps scale with the rate
    with pytest.raises(ValueError, match="unknown domains"):
        build_from_domains(dense, splits, BuildSettings(**{**vars(base), "domain_lr": {"web": 1e-3}}))


def test_domain_flags_parse_each_domain_once_with_a_value_in_range():
    from build_moe_fixture import parse_domain_values

    assert parse_domain_values(None) == {}
    assert parse_domain_values("web_a=5e-4, book_b=1e-3") == {"web_a": 5e-4, "book_b": 1e-3}
    for bad in ("web_a", "web_a=0", "web_a=x", "=1e-3", "web_a=1e-3,web_a=2e-3"):
        with pytest.raises(ValueError, match="--domain-lr"):
            parse_domain_values(bad)
    assert parse_domain_values("code_mbpp=0.02", "--domain-reinit", upper=1.0) == {"code_mbpp": 0.02}
    with pytest.raises(ValueError, match="--domain-reinit"):
        parse_domain_values("code_mbpp=1.5", "--domain-reinit", upper=1.0)


def test_domain_reinit_overrides_the_fraction_of_the_named_domain_only():
    from btx import expert_train_settings

    settings = BuildSettings(train=TrainSettings(steps=4, reinit=0.01), domain_reinit={"code": 0.02})
    assert expert_train_settings(settings, 0, "code").reinit == 0.02
    assert expert_train_settings(settings, 1, "web").reinit == 0.01


def test_routing_shares_count_the_top_k_slots_per_family():
    from btx_routing import slot_shares

    domains = ["web_a", "web_b", "book_a", "book_b"]
    # layer 1: token 0 -> (web_b, web_a), token 1 -> (book_a, web_a); layer 2: token 0 -> (book_b, book_a),
    # token 1 -> (web_a, book_b)
    layer1 = torch.tensor([[2.0, 3.0, 0.0, -1.0], [1.0, 0.0, 5.0, -1.0]])
    layer2 = torch.tensor([[0.0, -1.0, 1.0, 2.0], [3.0, 0.0, -1.0, 2.0]])
    shares = slot_shares([layer1, layer2], 2, domains, "web_a")
    assert shares["family_share"] == {"book": 0.5, "web": 0.5}
    assert shares["own_expert_share"] == 3 / 8
    assert shares["top1_family_accuracy"] == 2 / 4      # top-1: web_b, book_a | book_b, web_a


def test_routing_report_reads_the_routers_of_an_assembled_moe():
    from btx_routing import routing_report

    dense = tiny_model("llama", num_hidden_layers=3)
    w = mlp_weights(dense.model.layers[1].mlp)
    routers = {i: torch.zeros(4, dense.config.hidden_size) for i in (1, 2)}
    moe = assemble(dense, {1: [w] * 4, 2: [w] * 4}, routers, top_k=2)
    bias = torch.tensor([0.0, 1.0, 2.0, 3.0])           # every token: expert 3 ("qa_b") first, then expert 2

    def biased(module, args, out):
        return (out[0] + bias, *out[1:]) if isinstance(out, tuple) else out + bias

    handles = [moe.model.layers[i].mlp.gate.register_forward_hook(biased) for i in (1, 2)]
    ids = torch.randint(3, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    try:
        report = routing_report(moe, {"web_a": ids}, ["web_a", "web_b", "qa_a", "qa_b"])
    finally:
        for handle in handles:
            handle.remove()
    assert report["web_a"]["family_share"] == {"qa": 1.0, "web": 0.0}
    assert report["web_a"]["own_expert_share"] == 0.0 and report["web_a"]["top1_family_accuracy"] == 0.0


def test_expert_loss_from_a_computed_prefix_equals_the_full_pass_and_leaves_the_model_dense():
    from btx import expert_loss

    dense = tiny_model("llama", num_hidden_layers=3)
    trunk = Trunk(dense, 1)
    before = mlp_weights(dense.model.layers[2].mlp)
    g = torch.Generator().manual_seed(0)
    trained = {i: tuple(w + 0.05 * torch.randn(w.shape, generator=g) for w in mlp_weights(dense.model.layers[i].mlp))
               for i in (1, 2)}
    ids = torch.randint(3, 250, (3, 16), generator=g)
    full = expert_loss(trunk, trained, ids)
    assert expert_loss(trunk, trained, ids, hidden=trunk.prefix(ids)) == pytest.approx(full, rel=1e-6)
    assert full != pytest.approx(expert_loss(trunk, {}, ids), rel=1e-4)        # the expert is in the model
    assert all(torch.equal(a, b) for a, b in zip(before, mlp_weights(dense.model.layers[2].mlp)))


def test_drop_upcycle_redraws_only_the_chosen_neurons_from_each_matrix_statistics():
    from btx import drop_upcycle

    g0 = torch.Generator().manual_seed(0)
    gate, up = torch.randn(400, 32, generator=g0) * 0.05 + 0.01, torch.randn(400, 32, generator=g0) * 0.2
    down = torch.randn(32, 400, generator=g0) * 0.1 - 0.02
    (g, u, d), chosen = drop_upcycle((gate, up, down), 0.25, torch.Generator().manual_seed(1))
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    kept = torch.ones(400, dtype=torch.bool)
    kept[chosen] = False
    assert torch.equal(g[kept], gate[kept]) and torch.equal(u[kept], up[kept]) and torch.equal(d[:, kept], down[:, kept])
    assert (g[chosen] != gate[chosen]).all() and (d[:, chosen] != down[:, chosen]).all()
    for new, old in ((g[chosen], gate), (u[chosen], up), (d[:, chosen], down)):
        assert float(new.mean()) == pytest.approx(float(old.mean()), abs=0.1 * float(old.std()))
        assert float(new.std()) == pytest.approx(float(old.std()), rel=0.05)
    _, other = drop_upcycle((gate, up, down), 0.25, torch.Generator().manual_seed(2))
    assert set(other.tolist()) != set(chosen.tolist())
    assert len(drop_upcycle((gate, up, down), 0.0, torch.Generator().manual_seed(1))[1]) == 0


def test_reinit_experts_start_apart_and_keep_the_fingerprint_of_reinit_zero():
    from btx import expert_fingerprint, train_expert

    dense = tiny_model("llama", num_hidden_layers=3)
    before = mlp_weights(dense.model.layers[2].mlp)
    split = _splits(byte_tokenizer())[0]
    trunk = Trunk(dense, 2)
    hidden = trunk.prefix(split.train)
    moved = {}
    for ratio in (0.0, 0.25):
        trained, _ = train_expert(trunk, [2], hidden, split.train, TrainSettings(steps=1, batch=2, lr=1e-6, reinit=ratio))
        moved[ratio] = float(torch.cat([(a - b).flatten() for a, b in zip(trained[2], before)]).norm()
                             / torch.cat([b.flatten() for b in before]).norm())
    assert moved[0.0] < 1e-3 and 0.4 < moved[0.25] < 1.0      # ≈ √(2 · 0.25): a quarter of the neurons redrawn
    assert all(torch.equal(a, b) for a, b in zip(before, mlp_weights(dense.model.layers[2].mlp)))
    plain = expert_fingerprint([2], TrainSettings(steps=1), split.train)
    assert "reinit" not in plain and "('reinit', 0.25)" in expert_fingerprint([2], TrainSettings(steps=1, reinit=0.25),
                                                                            split.train)
    with pytest.raises(ValueError, match="reinit"):
        TrainSettings(reinit=1.5)


def test_routers_trained_on_the_moe_loss_lower_it_and_change_nothing_else():
    from btx import build_from_domains, held_out_loss

    dense = tiny_model("llama", num_hidden_layers=3)
    splits = _splits(byte_tokenizer())
    train = TrainSettings(steps=3, batch=2, lr=1e-2)
    plain, _ = build_from_domains(dense, splits, BuildSettings(experts=2, top_k=2, moe_layers=(1, 2), seq_len=32,
                                                               train=train))
    routed = BuildSettings(experts=2, top_k=2, moe_layers=(1, 2), seq_len=32, train=train,
                           router_train=TrainSettings(steps=12, batch=2, lr=5e-2, draw="epochs"))
    moe, info = build_from_domains(dense, splits, routed)
    fit = torch.cat([s.router_fit for s in splits])
    before, after = held_out_loss(Trunk(plain, 1), fit), held_out_loss(Trunk(moe, 1), fit)
    assert after < before - 1e-3                                   # the routers learned the loss they train on
    changed = [k for k, v in moe.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert sorted(changed) == ["model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]
    assert info["router_train_loss_first_last5"][0] > 0
    assert set(info["trained_router_top1_domain_accuracy_out_of_sample"]) == {1, 2}
    assert not any(p.requires_grad for p in moe.parameters())


def test_build_arguments_give_the_settings_and_refuse_a_per_domain_option_without_domains():
    from build_moe_fixture import argument_parser, build_settings

    parser = argument_parser()
    args = parser.parse_args(["--domains", "code_mbpp,web_a", "--experts", "2", "--reinit", "0.01",
                              "--domain-reinit", "code_mbpp=0.02", "--router-steps", "10", "--router-lr", "2e-2"])
    settings = build_settings(args, parser)
    assert settings.train.reinit == 0.01 and settings.domain_reinit == {"code_mbpp": 0.02}
    assert settings.router_train.steps == 10 and settings.router_train.lr == 2e-2 and settings.router_train.warmup == 1
    for bad in (["--domain-reinit", "code_mbpp=0.02"], ["--router-steps", "5"],
                ["--domains", "web_a", "--domain-reinit", "code_mbpp=0.02"]):
        with pytest.raises(SystemExit):
            build_settings(parser.parse_args(bad), parser)
