"""The label a plan gets in tables and reports."""

from hyperquant.kinds.dense import DenseQuantPlan
from hyperquant.kinds.phm import PHMQuantPlan
from hyperquant.plan import plan_label


def _ffn(i: int, part: str) -> str:
    return f"model.layers.{i}.mlp.{part}"


def test_a_capacity_plan_is_named_after_its_phm_layers_not_a_dense_tie():
    """The default's knapsack gives 40 FFN linears n^2 bases (stored as dense GPTQ), 40 B = 2 and 10 B = 3:
    PHM is the majority family (50 of 90), so the label names it."""
    dense, phm2, phm3 = DenseQuantPlan(), PHMQuantPlan(num_bases=2), PHMQuantPlan(num_bases=3)
    entries = [dense] * 40 + [phm2] * 40 + [phm3] * 10
    plan = {_ffn(i // 3, ("gate_proj", "up_proj", "down_proj")[i % 3]): e for i, e in enumerate(entries)}
    plan["model.layers.0.self_attn.q_proj"] = dense
    label = plan_label(plan)
    assert label.startswith("PHM n=2 B=2 GPTQ-4 g128 (50 layers differ)"), label
    assert label.endswith("+ dense GPTQ-4 g128 elsewhere"), label


def test_a_uniform_plan_keeps_its_plain_label():
    plan = {_ffn(0, "up_proj"): PHMQuantPlan(), "model.layers.0.self_attn.q_proj": DenseQuantPlan()}
    assert plan_label(plan) == "PHM n=2 B=2 GPTQ-4 g128 + dense GPTQ-4 g128 elsewhere"
