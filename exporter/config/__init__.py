"""The configuration, one module per job, each importing only those above it:

- ``wording``: how a mistake is told (``ConfigError``, ``describe_validation_error``);
- ``grammar``: the spelling of values (durations, sizes, IDs, addresses, the base URL);
- ``credentials``: the API key, where it comes from and the live reader (``ApiKeySource``);
- ``schema``: the models of the file and the validated ``Config``, with the flag overrides;
- ``loading``: the file, the environment, the build files and the ``ConfigLoader``.

Import each name from the module that owns it.
"""
