"""Django management commands of the ledger app (commands/). May import: Django and the ledger app."""
