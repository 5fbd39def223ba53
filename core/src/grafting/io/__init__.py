"""On disk: state dicts, atomic transactions, weights files, the Hub."""
