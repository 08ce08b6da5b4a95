"""One module per suite (`memfit bench <suite>`; '-' in the name maps to '_'), each defining `run(opts)`."""
