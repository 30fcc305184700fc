"""The small RLP demonstration (tools/rlp_demo.py, examples/rlp_pretrain.yaml and examples/rlp.yaml), shortened to
CI size: a short next-token pretraining on digit problems with worked thoughts, a few RLP steps on the same
kind of documents without thoughts, continued next-token pretraining for comparison, and the held-out
information gain of the three checkpoints. What must hold at this size: the mean reward rises over the RLP
run, and RLP's held-out information gain ends above the pretrained model's (the README has the full run)."""

import json

from tools import rlp_demo


def test_the_shortened_demo_raises_the_reward(tmp_path, capsys):
    code = rlp_demo.main([str(tmp_path / "demo"), "--pretrain-steps", "150", "--steps", "12", "--quiet",
                          "--json", str(tmp_path / "result.json"), "logging.interval=1", "eval.iters=1"])
    out = capsys.readouterr().out
    assert code == 0
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    rewards = [r for _, r in result["reward_curve"]]
    assert len(rewards) == 12 and "RLP mean reward" in out and "+ RLP" in out
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4, rewards
    gains = result["information_gain"]
    assert gains["rlp"]["information_gain"] > gains["pretrain"]["information_gain"], gains
    assert set(gains) == {"pretrain", "rlp", "ntp"} and all(g["positions"] > 0 for g in gains.values())
