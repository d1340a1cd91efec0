"""The configuration layer: what a user writes to configure a fit, and the command-line words for it.

- :mod:`bayes_spi.config.specs`: prior and likelihood *specs* (a name plus parameters), their schemas,
  parsing, checking and the option each is given with.
- :mod:`bayes_spi.config.commands`: the command-line vocabulary the library's messages and report use
  (options and the commands that make a run's files).
- :mod:`bayes_spi.config.fields`: the registry of intensity-field kinds (name, constructor, the settings it
  reads, help), read by the configuration's checks, the builder and the command line.

This layer imports nothing else from the package (the field registry names its constructors as
``"module:callable"`` strings, imported only when a field is built); the models, the workflows and the command
line import it.
(:class:`bayes_spi.infer.config.FitConfig`, the settings of one fit, is built from these specs.)
"""

__all__: list[str] = []
