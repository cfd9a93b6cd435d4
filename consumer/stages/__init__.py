"""The pipeline's stages, in the order a record passes them: intake, resolve, infer, records, delivery
(consumer/stages/base.py has the interface they share)."""
