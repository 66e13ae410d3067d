"""Assembly after the model: the shadow check and its sun geometry (``shadows``), buffers,
the usable-pixel mask and the analysis-ready outputs (``postprocess``)."""
