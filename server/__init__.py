"""The tracecode server: servicer -> verifier -> codec -> store (the only module that speaks Redis)."""
