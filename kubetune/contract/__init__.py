"""The contract between the operator and the trainer.

`facts` holds the names both sides must agree on (API identity, labels, env
vars, paths, the artifact layout) and imports nothing. `rules` is the base of
every API model (camelCase, CEL rules with Python twins). `recipe` is the one
definition of the training recipe: the FineTuneJob spec embeds its sections
and the trainer's config file is made of them, so a knob, its bounds and its
default exist once.
"""
