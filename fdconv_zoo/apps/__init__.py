"""The applications built on the library: training (``finetune``, ``segment``, ``detect`` on the shared loop of
``training``, with ``data`` and ``streaming`` for their datasets), ``analysis`` and its ``report``,
``benchmark``, ``export``, and the ``cli`` that runs them. They import the library (``fdconv_zoo.layers``,
``models``, ``conversion``, ``hub``); the library never imports them.
"""
