"""The relational index (SQLAlchemy 2): models, sessions, schema migrations."""
