//! What the user asked for, in three steps, a file each: the command line as clap parses it
//! (`cli`), the rules between flags checked in one place (`rules`), and the typed settings each
//! stage gets (`settings`). A new flag is a field of `cli::Cli` (with the rule of its own
//! value in its parser), its rules with other flags in `rules::check`, and where it goes in
//! `settings`.

pub mod cli;
mod rules;
pub mod settings;
