"""The entry points behind the ``hfweight`` command (:mod:`hfweight.cli`): ``pretrain``, ``sft``, ``grpo`` and ``rloo``
(each a ``DATACLASSES`` tuple the command line fills and a ``main`` taking them), ``demo`` (pipelines of those) and
``score_reference``. The repository's ``trainers/*.py`` are thin scripts over them."""
