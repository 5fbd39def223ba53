"""PEFT's API surface: PeftModel and its task classes, auto classes, preparation helpers, signatures."""
