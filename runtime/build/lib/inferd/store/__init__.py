"""The packed-model format: compressed, encrypted, signed model files, loadable without ever
writing plaintext to disk. One implementation, used by the `inferd pack|verify|unpack|keygen`
commands, the engine's loader and the Ansible model_decrypt module."""
