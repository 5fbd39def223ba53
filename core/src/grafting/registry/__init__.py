"""Plugin discovery and the method table: entry points, pluggy, known methods, configs by peft_type."""
