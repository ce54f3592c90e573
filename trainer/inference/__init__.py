"""The inference room: a trained run's model (`loading`), MDLM generation (`generate`), evaluation
(`evaluate`), answer scoring (`scoring`) and PEFT export (`export`). Submodules are imported by name;
this package re-exports nothing.
"""
