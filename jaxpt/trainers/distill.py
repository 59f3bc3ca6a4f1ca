"""The on-policy distillation run: the teacher loaded beside the student (same vocabulary,
checked), completions sampled from the student and the train step of
``jaxpt.algorithms.distill``'s divergence against the teacher's distributions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpt.algorithms.distill import (
    DistillBatch,
    DistillSection,
    DistillSource,
    batch_stats,
    make_distill_loss_fn,
)
from jaxpt.config import RunConfig
from jaxpt.engine import build as eb
from jaxpt.engine import state as es
from jaxpt.engine.loop import Trainer
from jaxpt.models import hub
from jaxpt.rl.hybrids import Demonstrations
from jaxpt.rl.rollout import decode_policy
from jaxpt.rl.run import start_on_policy
from jaxpt.rl.scoring import make_score_fn
from jaxpt.trainers.registry import register_builder


def check_same_vocab(where: str, student_name: str, student_tok, student_vocab: int,
                     teacher_name: str, teacher_tok, teacher_vocab: int) -> None:
    """The teacher's distribution is compared with the student's token by token, so both
    need one vocabulary: the same LM-head size and the same token -> id map. Raises a
    ValueError naming both models and the first difference."""
    head = (f"{where}: distill.teacher={teacher_name!r} and model.name={student_name!r} do not "
            "share a vocabulary (distillation compares the two models' distributions over the "
            "same token ids; use a teacher with the student's tokenizer): ")
    if teacher_vocab != student_vocab:
        raise ValueError(head + f"the teacher's LM head has {teacher_vocab} rows, the "
                         f"student's {student_vocab}")
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        s_ids = {i: t for t, i in s_vocab.items()}
        t_ids = {i: t for t, i in t_vocab.items()}
        first = min(i for i in set(s_ids) | set(t_ids) if s_ids.get(i) != t_ids.get(i))
        raise ValueError(head + f"the tokenizers have {len(t_vocab)} (teacher) and "
                         f"{len(s_vocab)} (student) tokens; id {first} is "
                         f"{t_ids.get(first)!r} in the teacher, {s_ids.get(first)!r} in the "
                         "student")


def load_teacher(cfg: RunConfig, d: DistillSection, student: eb.ModelBundle) -> eb.ModelBundle:
    """The teacher in the student's mesh and training shardings, after checking that it
    shares the student's vocabulary (before its weights are read)."""
    if not d.teacher:
        raise ValueError(f"{cfg.source}: distill.teacher is not set: name the teacher model "
                         "(a name or path, as for model.name)")
    resolved = hub.resolve(d.teacher)
    check_same_vocab(cfg.source, cfg.model.name, student.tokenizer, student.model_cfg.vocab_size,
                     d.teacher, resolved.tokenizer(), resolved.config().vocab_size)
    teacher_cfg = cfg.replace(model=dataclasses.replace(cfg.model, name=d.teacher, tokenizer=None))
    return eb.load_model_bundle(teacher_cfg, student.mesh)


@dataclasses.dataclass
class DistillParts(eb.RunParts):
    teacher: eb.ModelBundle  # its params live in the trainer's state.frozen["teacher"]


def distill_program(cfg: RunConfig, bundle, teacher, total_steps: int):
    """(the batch's shardings, the ``TrainProgram``) of a run: the student's train state
    with the teacher's params beside the student's frozen ones in ``state.frozen``, and the
    jitted step. The program's ``trainable`` is the student's view of that state: its
    ``params_fn`` gives the student's params alone (sampling, scoring, evaluation). On
    abstract bundles (``jaxpt plan --compile``) every part is shapes only."""
    d: DistillSection = cfg.section("distill")
    t = cfg.train
    loss_fn = make_distill_loss_fn(bundle.graphdef, teacher.graphdef, d, impl=t.logprob_impl)
    batch_sh = es.batch_shardings(DistillBatch.ndims(d), bundle.mesh)
    tx, schedule = es.make_optimizer(cfg.optim, total_steps)
    ts = eb.build_train_state(bundle, cfg, tx)  # frozen: the LoRA base, or None
    student_fn = ts.params_fn

    def params_fn(params, frozen, rng):  # what the loss takes: both models
        return {"student": student_fn(params, frozen["student"], rng),
                "teacher": frozen["teacher"]}

    state = ts.state.replace(frozen={"student": ts.state.frozen, "teacher": teacher.params})
    shardings = ts.shardings.replace(
        frozen={"student": ts.shardings.frozen, "teacher": teacher.params_sh})
    step = es.make_train_step(loss_fn, tx, schedule, grad_accum=t.grad_accum,
                              batch_stats_fn=batch_stats, params_fn=params_fn)
    step_fn = es.compile_step(step, shardings, batch_sh, bundle.mesh)
    # The student alone, for sampling, scoring and evaluation.
    if student_fn is es.identity_params:
        student_view = dataclasses.replace(ts, state=state, shardings=shardings)
    else:
        student_view = dataclasses.replace(
            ts, state=state, shardings=shardings,
            params_fn=lambda p, frozen, rng: student_fn(p, frozen["student"], rng))
    return batch_sh, eb.TrainProgram(student_view, tx, step_fn)


def abstract_teacher(cfg: RunConfig, d: DistillSection, student: eb.ModelBundle):
    """The teacher as shapes in the student's mesh and training shardings (``jaxpt plan
    --compile``): its config read like the student's (a name, a path, a ``config.json``),
    in the run's dtypes; a vocabulary size other than the student's is the error
    :func:`check_same_vocab` gives."""
    from jaxpt.cli.plan import load_model_config

    if not d.teacher:
        raise ValueError(f"{cfg.source}: distill.teacher is not set: name the teacher model "
                         "(a name or path, as for model.name)")
    teacher_cfg = cfg.replace(model=dataclasses.replace(cfg.model, name=d.teacher, tokenizer=None))
    model_cfg = load_model_config(teacher_cfg)
    if model_cfg.vocab_size != student.model_cfg.vocab_size:
        raise ValueError(
            f"{cfg.source}: distill.teacher={d.teacher!r} and model.name={cfg.model.name!r} do "
            f"not share a vocabulary: the teacher's LM head has {model_cfg.vocab_size} rows, "
            f"the student's {student.model_cfg.vocab_size}")
    return eb.abstract_bundle(teacher_cfg, student.mesh, model_cfg)


def aot_programs(cfg: RunConfig, bundle) -> list:
    """The student's train step (the teacher's forward inside it, over the same rows) on a
    step's rows at full widths, and the student's rollout prefill and decode loop, for
    ``jaxpt plan --compile``. The teacher has no program of its own: the loss runs it on
    ``state.frozen["teacher"]``. The model FLOPs of the step count the student's forward
    and backward and the teacher's forward."""
    from jaxpt.engine.aot import train_step_flops
    from jaxpt.rl.aot import full_rows, rollout_programs, train_step_program

    d: DistillSection = cfg.section("distill")
    R, P, C = cfg.train.batch_size, d.max_prompt_length, d.max_completion_length
    teacher = abstract_teacher(cfg, d, bundle)
    batch_sh, program = distill_program(cfg, bundle, teacher, cfg.train.max_steps or 1000)
    old = np.zeros((R, C), np.float32) if d.scores_old_logprobs() else None
    batch = DistillBatch(full_rows(R, P, C), np.zeros(R, np.float32), old_logprobs=old)
    step = train_step_program(program, batch, batch_sh, bundle, rows=R, length=P + C)
    step.flops += train_step_flops(teacher.model_cfg, R, P + C) / 3
    return [step, *rollout_programs(d, bundle, R * d.steps_per_generation)]


def build_distill_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    d: DistillSection = cfg.section("distill")
    t, G = cfg.train, d.num_generations
    run = start_on_policy(cfg, "distill", mesh=mesh, demonstrations=d.lmbda < 1.0)
    bundle, mesh = run.bundle, run.mesh
    if d.lmbda < 1.0:
        missing = [p for p in run.train_prompts if p.columns.get("completion") is None]
        if missing:
            raise ValueError(
                f"{cfg.source}: distill.lmbda={d.lmbda} trains {1 - d.lmbda:.0%} of the rounds "
                f"on the dataset's completions, but train row {missing[0].row} (and "
                f"{len(missing) - 1} more) has no `completion` column (set distill.lmbda: 1 "
                "for on-policy only)")
    teacher = load_teacher(cfg, d, bundle)
    batch_sh, program = distill_program(cfg, bundle, teacher, run.total_steps)
    student_view, state = program.trainable, program.trainable.state
    params_of_state, decode_sh = decode_policy(student_view, bundle.params, mesh)
    sampler = run.sampler(decode_sh)
    score_fn = make_score_fn(bundle.graphdef, student_view.params_fn, impl=t.logprob_impl,
                             temperature=d.temperature if d.temperature > 0 else 1.0,
                             rows_sh=batch_sh.rows, mesh=mesh, rows_per_call=t.batch_size)
    demos = Demonstrations(bundle.tokenizer, run.pad_id, d.max_completion_length, G)
    source = DistillSource(
        d, demos=demos, prompts=run.train_prompts, sampler=sampler,
        make_batch=lambda ro, chosen, pb: DistillBatch(ro.rows, ro.advantages_R),
        rows_per_step=t.batch_size, params_of_state=params_of_state, score_fn=score_fn,
        score_ref=False, seed=t.seed)
    return run.trainer(
        state=state, step_fn=program.step_fn, source=source, put_batch=run.put_batch(batch_sh),
        parts=DistillParts(bundle, student_view, program.tx, teacher=teacher),
        sampler=sampler, params_of_state=params_of_state)


train_distill = register_builder("distill", build_distill_trainer,
                                 summary=("loss", "eval_accuracy"))
