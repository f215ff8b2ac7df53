"""Makes tests/trl_grpo.json, the numbers tests/test_rl.py compares rl.py against: TRL's own
GRPOTrainer._compute_loss and GKDTrainer.generalized_jsd_loss on fixed inputs (a stand-in
trainer object, no model). Not a test and not run by CI: TRL is not a dependency. To make the
numbers again (another TRL version):

    pip install --target /tmp/trl trl==1.16.0
    PYTHONPATH=/tmp/trl python tests/trl_grpo_make.py tests/trl_grpo.json
"""
import json
import sys
import types
from collections import defaultdict
import torch
import trl
from trl import GRPOTrainer
from trl.experimental.gkd.gkd_trainer import GKDTrainer

g = torch.Generator().manual_seed(0)
B, T = 4, 6
logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
old = logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2
ref = logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.6
adv = torch.tensor([1.3, -0.7, 0.0, -1.9], dtype=torch.float64)
mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)


def stand_in(loss_type, beta, eps_low, eps_high, lp):
    tr = object.__new__(GRPOTrainer)
    tr.top_entropy_quantile, tr.off_policy_mask_threshold, tr.importance_sampling_level = 1.0, None, "token"
    tr.beta, tr.loss_type, tr.epsilon_low, tr.epsilon_high = beta, loss_type, eps_low, eps_high
    tr.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None)
    tr.use_vllm, tr.vllm_importance_sampling_correction, tr.aux_loss_enabled = False, False, False
    tr.model = types.SimpleNamespace(training=False)        # "eval": no gradient-accumulation scaling
    tr.max_completion_length, tr.current_gradient_accumulation_steps = 8, 1
    tr.accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x)
    tr._entropy_bonus_enabled = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
    return tr


cases = []
grid = [(lt, b, 0.2, 0.28) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for b in (0.0, 0.04)] + [("grpo", 0.0, 0.2, 0.2)]
for lt, beta, lo, hi in grid:
    for n_items in ([mask.sum().item()] if lt != "dapo" else [mask.sum().item(), 30.0]):
        lp = logps.clone().requires_grad_()
        tr = stand_in(lt, beta, lo, hi, lp)
        inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
                  "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
                  "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
                  "num_items_in_batch": torch.tensor(n_items, dtype=torch.float64)}
        loss = tr._compute_loss(None, inputs)
        loss.backward()
        metrics = {k: v[-1] for k, v in tr._metrics["eval"].items()}
        cases.append({"params": {"loss_type": lt, "beta": beta, "epsilon_low": lo, "epsilon_high": hi,
                                 "max_completion_length": 8},
                      "inputs": {"logps": logps.tolist(), "old_logps": old.tolist(), "ref_logps": ref.tolist(),
                                 "advantages": adv.tolist(), "mask": mask.tolist(), "num_items_in_batch": n_items},
                      "loss": loss.item(), "grad_logps": lp.grad.tolist(), "metrics": metrics})

gkd = []
s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
labels = torch.tensor([[3, -100, 1], [0, 2, -100]])
for beta in (0.0, 0.5, 1.0):
    for temp in (1.0, 2.0):
        v = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temp, reduction="batchmean")
        gkd.append({"params": {"beta": beta, "temperature": temp}, "inputs": {"student_logits": s.tolist(),
                    "teacher_logits": t.tolist(), "labels": labels.tolist()}, "loss": v.item()})
v = GKDTrainer.generalized_jsd_loss(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean")
gkd.append({"params": {"beta": 0.5, "temperature": 1.0}, "inputs": {"student_logits": s.tolist(),
            "teacher_logits": t.tolist(), "labels": None}, "loss": v.item()})
out = {"versions": {"trl": trl.__version__, "torch": torch.__version__},
       "notes": ["GRPOTrainer._compute_loss(None, inputs) on a stand-in (object.__new__) whose "
                 "_get_per_token_logps_and_entropies returns `logps`; model.training False, so no gradient-"
                 "accumulation scaling and dapo divides by num_items_in_batch / num_processes (1)",
                 "GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, "
                 "reduction='batchmean')", "made by /tmp/trlcheck/grpo/make.py (TRL installed outside the repo)"],
       "grpo": cases, "gkd": gkd}
json.dump(out, open(sys.argv[1], "w"))
print(len(cases), "grpo cases,", len(gkd), "gkd cases;", cases[0]["metrics"])
