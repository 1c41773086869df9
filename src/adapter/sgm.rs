//! SDXL's original (sgm) UNet names in kohya files: sd-scripts trains SDXL on its own copy of
//! that UNet, so its files name modules `input_blocks_4_1_…`, `middle_block_1_…`,
//! `output_blocks_2_0_in_layers_2`, `time_embed_0`; an export of diffusers' UNet has
//! `down_blocks.1.attentions.0.…`. [`UnetLayout`] reads the model's own blocks from its module
//! paths and maps the one naming onto the other, block by block, as the sgm UNet lays them out.

use std::borrow::Cow;

/// One down or up block of a diffusers UNet, as its module paths show it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Block {
    /// Resnets in the block (`resnets.<n>`).
    resnets: usize,
    /// Whether the block has attentions beside its resnets (`CrossAttn…Block2D`).
    attentions: bool,
    /// Whether it ends in a down- or upsampler.
    sampler: bool,
}

/// The blocks of the model's diffusers UNet (`down_blocks`, `mid_block`, `up_blocks`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UnetLayout {
    down: Vec<Block>,
    mid_attention: bool,
    up: Vec<Block>,
}

/// The sgm prefixes of the three block sequences.
const SGM_BLOCKS: [&str; 3] = ["input_blocks_", "middle_block_", "output_blocks_"];

/// Whether a kohya UNet module name uses the sgm block names.
fn is_sgm_block(name: &str) -> bool {
    SGM_BLOCKS.iter().any(|p| name.starts_with(p))
}

/// Whether a kohya UNet module name is an sgm name: a block's, or one of the UNet's own
/// layers outside the blocks (time and added embeddings, the output convolution).
fn is_sgm_name(name: &str) -> bool {
    is_sgm_block(name)
        || ["time_embed_", "label_emb_", "out_"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// Whether a kohya UNet module name uses diffusers' block names.
fn is_diffusers_block(name: &str) -> bool {
    ["down_blocks_", "mid_block_", "up_blocks_"]
        .iter()
        .any(|p| name.starts_with(p))
}

impl UnetLayout {
    /// The layout from the model's dotted module paths (a UNet rooted anywhere: the path is
    /// read from its `down_blocks` / `mid_block` / `up_blocks` component). None when the model
    /// has no diffusers down blocks.
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut layout = UnetLayout::default();
        for path in paths {
            let parts: Vec<&str> = path.split('.').collect();
            let Some(at) = parts
                .iter()
                .position(|p| matches!(*p, "down_blocks" | "up_blocks" | "mid_block"))
            else {
                continue;
            };
            let rest = &parts[at + 1..];
            if parts[at] == "mid_block" {
                layout.mid_attention |= rest.first() == Some(&"attentions");
                continue;
            }
            let Some(b) = rest.first().and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            let blocks = if parts[at] == "down_blocks" {
                &mut layout.down
            } else {
                &mut layout.up
            };
            if blocks.len() <= b {
                blocks.resize(b + 1, Block::default());
            }
            let block = &mut blocks[b];
            match rest.get(1).copied() {
                Some("resnets") => {
                    if let Some(n) = rest.get(2).and_then(|s| s.parse::<usize>().ok()) {
                        block.resnets = block.resnets.max(n + 1);
                    }
                }
                Some("attentions") => block.attentions = true,
                Some("downsamplers" | "upsamplers") => block.sampler = true,
                _ => {}
            }
        }
        (!layout.down.is_empty()).then_some(layout)
    }

    /// The diffusers name (underscored, as kohya writes names) of an sgm-named kohya UNet
    /// module (`name` without `lora_unet_`); None when it names nothing of this layout (a
    /// block beyond the model's, or a part no LoRA targets, such as a norm).
    pub fn to_diffusers(&self, name: &str) -> Option<String> {
        let top = [
            ("input_blocks_0_0", "conv_in"),
            ("out_2", "conv_out"),
            ("time_embed_0", "time_embedding_linear_1"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
        ];
        if let Some((_, d)) = top.iter().find(|(s, _)| *s == name) {
            return Some(d.to_string());
        }
        if let Some(rest) = name.strip_prefix("input_blocks_") {
            let (i, j, inner) = two_indices(rest)?;
            // input_blocks_0 is conv_in (above); then, block by block, one per layer (its
            // resnet, then its attention) and one for the downsampler.
            let mut k = 0;
            for (b, block) in self.down.iter().enumerate() {
                for l in 0..block.resnets {
                    k += 1;
                    if k == i {
                        let parts = [Some("resnets"), block.attentions.then_some("attentions")];
                        let what = parts.get(j).copied()??;
                        return member(&format!("down_blocks_{b}"), l, what, inner);
                    }
                }
                if block.sampler {
                    k += 1;
                    if k == i {
                        return (j == 0 && inner == "op")
                            .then(|| format!("down_blocks_{b}_downsamplers_0_conv"));
                    }
                }
            }
            return None;
        }
        if let Some(rest) = name.strip_prefix("middle_block_") {
            let (j, inner) = one_index(rest)?;
            let seq: &[(&str, usize)] = if self.mid_attention {
                &[("resnets", 0), ("attentions", 0), ("resnets", 1)]
            } else {
                &[("resnets", 0), ("resnets", 1)]
            };
            let (what, n) = seq.get(j)?;
            return member("mid_block", *n, what, inner);
        }
        if let Some(rest) = name.strip_prefix("output_blocks_") {
            let (i, j, inner) = two_indices(rest)?;
            // One per layer of each up block: its resnet, its attention, and after the last
            // layer's the upsampler.
            let mut k = 0;
            for (b, block) in self.up.iter().enumerate() {
                for l in 0..block.resnets {
                    if k == i {
                        let last = l + 1 == block.resnets && block.sampler;
                        let parts: Vec<&str> = std::iter::once("resnets")
                            .chain(block.attentions.then_some("attentions"))
                            .chain(last.then_some("upsamplers"))
                            .collect();
                        return match *parts.get(j)? {
                            "upsamplers" => (inner == "conv")
                                .then(|| format!("up_blocks_{b}_upsamplers_0_conv")),
                            what => member(&format!("up_blocks_{b}"), l, what, inner),
                        };
                    }
                    k += 1;
                }
            }
            return None;
        }
        None
    }
}

/// `<block>_<what>_<l>_<inner>` (`block`: `down_blocks_1`, `mid_block`, ...), with a resnet's
/// inner layer named as diffusers names it; None for a layer no LoRA targets (a norm) or none.
fn member(block: &str, l: usize, what: &str, inner: &str) -> Option<String> {
    let inner = if what == "resnets" {
        // the sgm ResBlock's layers and diffusers' ResnetBlock2D's
        match inner {
            "in_layers_2" => "conv1",
            "out_layers_3" => "conv2",
            "emb_layers_1" => "time_emb_proj",
            "skip_connection" => "conv_shortcut",
            _ => return None,
        }
    } else if inner.is_empty() {
        return None;
    } else {
        inner
    };
    Some(format!("{block}_{what}_{l}_{inner}"))
}

/// `<n>_<rest>` (or `<n>` alone) → (n, rest); a number as sd-scripts writes it (no sign, no
/// leading zero).
fn one_index(s: &str) -> Option<(usize, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end > 1 && s.starts_with('0') {
        return None;
    }
    let n = s[..end].parse().ok()?;
    match &s[end..] {
        "" => Some((n, "")),
        rest => Some((n, rest.strip_prefix('_')?)),
    }
}

/// `<i>_<j>_<rest>` → (i, j, rest).
fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let (i, rest) = one_index(s)?;
    let (j, rest) = one_index(rest)?;
    Some((i, j, rest))
}

/// The names a kohya file's modules are bound by (`names`: the modules' underscored names and
/// whether each is the UNet's): sgm-named UNet modules translated by the model's layout
/// (`paths`: its dotted module paths), the rest as they are (Borrowed: not translated). A model
/// whose own paths use the sgm names (no diffusers blocks) takes them as they are. Err: the
/// file names UNet blocks both ways (diffusers would keep one naming and drop the other).
pub fn bind_names<'a>(
    names: &[(&'a str, bool)],
    paths: &[&str],
) -> Result<Vec<Cow<'a, str>>, String> {
    let as_they_are = || names.iter().map(|(n, _)| Cow::Borrowed(*n)).collect();
    if !names.iter().any(|(n, unet)| *unet && is_sgm_name(n)) {
        return Ok(as_they_are());
    }
    let sgm = names.iter().find(|(n, unet)| *unet && is_sgm_block(n));
    let diffusers = names
        .iter()
        .find(|(n, unet)| *unet && is_diffusers_block(n));
    if let (Some((s, _)), Some((d, _))) = (sgm, diffusers) {
        return Err(format!(
            "the file names UNet blocks both in SDXL's original (sgm) form ('lora_unet_{s}') and in diffusers' form ('lora_unet_{d}'); keep one"
        ));
    }
    let Some(layout) = UnetLayout::from_paths(paths.iter().copied()) else {
        return Ok(as_they_are());
    };
    Ok(names
        .iter()
        .map(
            |(n, unet)| match unet.then(|| layout.to_diffusers(n)).flatten() {
                Some(d) => Cow::Owned(d),
                None => Cow::Borrowed(*n),
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL's UNet: down blocks (DownBlock2D, CrossAttn, CrossAttn), two layers each, the last
    /// without a downsampler; up blocks (CrossAttn, CrossAttn, UpBlock2D), three layers each,
    /// the last without an upsampler; a mid block with an attention.
    fn sdxl() -> UnetLayout {
        let mut paths = Vec::new();
        for b in 0..3 {
            for l in 0..2 {
                paths.push(format!("down_blocks.{b}.resnets.{l}.conv1"));
                if b > 0 {
                    paths.push(format!("down_blocks.{b}.attentions.{l}.proj_in"));
                }
            }
            if b < 2 {
                paths.push(format!("down_blocks.{b}.downsamplers.0.conv"));
            }
            for l in 0..3 {
                paths.push(format!("up_blocks.{b}.resnets.{l}.conv1"));
                if b < 2 {
                    paths.push(format!("up_blocks.{b}.attentions.{l}.proj_in"));
                }
            }
            if b < 2 {
                paths.push(format!("up_blocks.{b}.upsamplers.0.conv"));
            }
        }
        paths.push("mid_block.attentions.0.proj_in".into());
        paths.push("mid_block.resnets.1.conv1".into());
        // (rooted: read from the block components wherever they are)
        let paths: Vec<String> = paths.iter().map(|p| format!("unet.{p}")).collect();
        UnetLayout::from_paths(paths.iter().map(String::as_str)).unwrap()
    }

    #[test]
    fn sdxl_blocks_map_as_the_sgm_unet_lays_them_out() {
        let l = sdxl();
        let t = |s: &str| l.to_diffusers(s);
        let cases = [
            ("input_blocks_0_0", Some("conv_in")),
            (
                "input_blocks_1_0_in_layers_2",
                Some("down_blocks_0_resnets_0_conv1"),
            ),
            (
                "input_blocks_2_0_emb_layers_1",
                Some("down_blocks_0_resnets_1_time_emb_proj"),
            ),
            (
                "input_blocks_3_0_op",
                Some("down_blocks_0_downsamplers_0_conv"),
            ),
            (
                "input_blocks_4_0_skip_connection",
                Some("down_blocks_1_resnets_0_conv_shortcut"),
            ),
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                Some("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
            ),
            (
                "input_blocks_5_1_proj_out",
                Some("down_blocks_1_attentions_1_proj_out"),
            ),
            (
                "input_blocks_6_0_op",
                Some("down_blocks_1_downsamplers_0_conv"),
            ),
            (
                "input_blocks_8_1_proj_in",
                Some("down_blocks_2_attentions_1_proj_in"),
            ),
            ("input_blocks_9_0_in_layers_2", None), // beyond the model
            ("input_blocks_1_1_proj_in", None),     // DownBlock2D has no attention
            ("input_blocks_1_0_in_layers_0", None), // a norm
            (
                "middle_block_0_out_layers_3",
                Some("mid_block_resnets_0_conv2"),
            ),
            (
                "middle_block_1_proj_in",
                Some("mid_block_attentions_0_proj_in"),
            ),
            (
                "middle_block_2_in_layers_2",
                Some("mid_block_resnets_1_conv1"),
            ),
            (
                "output_blocks_0_0_in_layers_2",
                Some("up_blocks_0_resnets_0_conv1"),
            ),
            (
                "output_blocks_2_1_ff_net_2",
                Some("up_blocks_0_attentions_2_ff_net_2"),
            ),
            (
                "output_blocks_2_2_conv",
                Some("up_blocks_0_upsamplers_0_conv"),
            ),
            (
                "output_blocks_5_2_conv",
                Some("up_blocks_1_upsamplers_0_conv"),
            ),
            (
                "output_blocks_6_0_skip_connection",
                Some("up_blocks_2_resnets_0_conv_shortcut"),
            ),
            (
                "output_blocks_8_0_out_layers_3",
                Some("up_blocks_2_resnets_2_conv2"),
            ),
            ("output_blocks_8_1_conv", None),
            ("time_embed_2", Some("time_embedding_linear_2")),
            ("label_emb_0_0", Some("add_embedding_linear_1")),
            ("out_2", Some("conv_out")),
        ];
        for (sgm, want) in cases {
            assert_eq!(t(sgm).as_deref(), want, "{sgm}");
        }
    }

    #[test]
    fn an_up_block_without_attention_has_its_upsampler_second() {
        // SD 1.x's first up block (UpBlock2D, three layers, an upsampler)
        let l = UnetLayout::from_paths([
            "down_blocks.0.resnets.0.conv1",
            "up_blocks.0.resnets.2.conv1",
            "up_blocks.0.upsamplers.0.conv",
        ])
        .unwrap();
        assert_eq!(
            l.to_diffusers("output_blocks_2_1_conv").as_deref(),
            Some("up_blocks_0_upsamplers_0_conv")
        );
        assert_eq!(l.to_diffusers("output_blocks_1_1_conv"), None);
    }

    #[test]
    fn names_bind_one_way_only() {
        let paths = ["down_blocks.0.resnets.0.conv1"];
        let names = bind_names(
            &[
                ("input_blocks_1_0_in_layers_2", true),
                ("text_model_encoder_layers_0_mlp_fc1", false),
            ],
            &paths,
        )
        .unwrap();
        assert!(matches!(&names[0], Cow::Owned(n) if n == "down_blocks_0_resnets_0_conv1"));
        assert!(matches!(
            names[1],
            Cow::Borrowed("text_model_encoder_layers_0_mlp_fc1")
        ));
        // a file with only the UNet's layers outside the blocks
        let names = bind_names(&[("time_embed_0", true), ("out_2", true)], &paths).unwrap();
        assert_eq!(names, ["time_embedding_linear_1", "conv_out"]);
        // a model with the sgm names itself: as they are
        let names = bind_names(
            &[("input_blocks_1_0_in_layers_2", true)],
            &["input_blocks.1.0.in_layers.2"],
        )
        .unwrap();
        assert!(matches!(
            names[0],
            Cow::Borrowed("input_blocks_1_0_in_layers_2")
        ));
        let err = bind_names(
            &[
                ("input_blocks_1_0_in_layers_2", true),
                ("down_blocks_0_resnets_0_conv1", true),
            ],
            &paths,
        )
        .unwrap_err();
        assert!(err.contains("both"), "{err}");
    }

    #[test]
    fn numbers_are_written_as_sd_scripts_writes_them() {
        let l = sdxl();
        assert_eq!(l.to_diffusers("input_blocks_04_1_proj_in"), None);
        assert_eq!(l.to_diffusers("input_blocks_4_01_proj_in"), None);
        assert_eq!(l.to_diffusers("input_blocks_+4_1_proj_in"), None);
        assert!(l.to_diffusers("input_blocks_4_1_proj_in").is_some());
    }
}
