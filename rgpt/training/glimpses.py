"""What the loop shows of the model while it trains: a greedy sample of the monitor's prompt, each layer's
attention over it as TensorBoard images, and the live float64 gradient check."""

from rgpt.inference.generate import DecodeConfig, generate


class Glimpses:
    def __init__(self, model, tok, monitor, chat_template: bool, log=print):
        """monitor: rgpt.training.settings.MonitorSettings; chat_template: the prompt as a chat turn."""
        self.model, self.tok, self.mon, self.chat, self.log = model, tok, monitor, chat_template, log
        self._fonts = None  # the attention images' fonts, loaded at the first image

    def prompt_ids(self) -> list[int]:
        """The sample prompt as the model sees it: a chat turn, or plain text (the stage says which)."""
        prompt = self.mon.sample_prompt
        if self.chat:
            return self.tok.encode_prompt([("user", prompt)])
        return self.tok.encode_pretrain(prompt)[:-1]  # without the closing <eos>

    def sample(self) -> str:
        """Greedy continuation of the configured prompt: a glimpse of what the model has learned."""
        m = self.model
        m.eval()
        out = generate(m, self.prompt_ids(), DecodeConfig(max_new_tokens=self.mon.sample_tokens))
        m.train()
        return self.mon.sample_prompt + " → " + self.tok.decode(out)

    def attention_images(self, step: int, monitor) -> None:
        """monitor.attention_every: each layer's heads over the sample prompt, one TensorBoard image a layer."""
        from rgpt.viz.lens import attention_maps
        from rgpt.viz.plot import layer_images, load_fonts

        if self._fonts is None:
            self._fonts = load_fonts(log=self.log)
        ids = self.prompt_ids()[: self.model.config.block_size]
        tokens = [self.tok.tokens[i] for i in ids]
        for layer, picture in enumerate(layer_images(attention_maps(self.model, ids), tokens, self._fonts)):
            monitor.image(f"attention/layer_{layer}", picture, step)

    def gradcheck(self, batch, step: int, monitor) -> None:
        """monitor.gradcheck_every: the hand-written gradient of this micro-batch against float64 finite
        differences (rgpt.training.gradcheck), logged; a failure is a loud warning naming the parameter."""
        from rgpt.training.gradcheck import gradient_check

        b = batch.to(self.model.device)
        report = gradient_check(self.model, b.idx, b.targets, seed=step)
        self.log(f"step {step + 1}: {report.summary()}")
        if report.failed:
            self.log(report.warning())
        monitor.scalars(
            step + 1,
            {"gradcheck/worst_rel_error": report.worst.rel_error, "gradcheck/seconds": report.seconds},
        )
