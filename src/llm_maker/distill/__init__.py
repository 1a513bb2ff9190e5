"""Knowledge distillation: a student learns from a teacher's next-token distribution.

loss.py      DistillLoss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy
teacher.py   the teacher (identity, tokenizer check, loading), online teacher batches and the
             cached top-k file beside the pack (pack/teacher/<hash12>-k<k>-T<T>-L<seq_len>/)
stage.py     run_distill: the distill stage (distill/ in the run directory)
"""
