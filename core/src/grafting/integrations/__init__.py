"""Glue for training libraries that recognise adapter models only by peft's classes.

transformers' ``Trainer``, TRL and accelerate decide how to save, resume and
patch a model with ``isinstance(model, peft.PeftModel)``, which is never true
without peft installed. Each module here is the smallest subclass that gives a
grafting model the treatment peft gets there; import it instead of the
library's own class:

* :mod:`grafting.integrations.transformers`: ``Trainer``, ``Seq2SeqTrainer`` and
  :class:`~grafting.integrations.transformers.AdapterTrainerMixin` for any other
  ``Trainer`` subclass;
* :mod:`grafting.integrations.trl`: ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``RewardTrainer``
  (each also takes ``peft_config=`` a grafting config, as TRL's take peft's).

Nothing here changes how these libraries treat any other model.
"""
