"""mailer: render a post once, personalise it cheaply, deliver it exactly once."""

__version__ = "0.1.0"
